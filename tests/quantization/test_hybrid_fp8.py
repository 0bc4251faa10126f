"""fp8 on the hybrid recurrent-state models (Qwen3-Next, Granite 4.0-H, Nemotron-H): the linear
projections quantized (Mamba ``in_proj`` / ``out_proj``, the DeltaNet projections, attention,
MLP and MoE experts), the recurrent kernels' small parameters (conv1d, A_log, D, dt_bias, the
gated norm) kept in the model dtype, as vLLM does.

* block-wise fp8 checkpoints (Qwen3-Next-80B-A3B-*-FP8's layout: ``weight_scale_inv`` per
  128x128 block, ``in_proj_ba`` left in bf16) of tiny random models built from HF configs,
  served on the cpu backend (W8A16: the fp8 codes dequantized a slab at a time), give the
  greedy tokens of the dequantized checkpoint served by tessellm and by HF transformers
  (float32). The stored ``in_proj`` (five parts of a Mamba mixer; the DeltaNet's parts grouped
  by key head) is cut with its block scales, so a wrong cut gives other tokens;
* ``quantization="fp8"`` on a dense checkpoint (W8A8, per-channel weights, per-token
  activations): each quantized ``in_proj`` holds exactly the per-row fp8 of the dense model's
  (regrouped) weight, and the model's greedy continuation agrees with the dense model's
  (teacher-forced top-1, the bar of ``test_engine.py``);
* schemes the hybrid layers are not built for are refused at engine start in one sentence.
"""

from __future__ import annotations

import pytest
import torch

from tessellm import LLM, SamplingParams
from tessellm.quantization.packed import quantize_fp8
from tests.quantization.block_fp8_checkpoint import (assert_serves_dequantized, build,
                                                     checkpoint_maker, generate,
                                                     write_fp8_per_tensor)

PROMPTS = [[5, 17, 42, 99, 3, 120], [7, 7, 7], list(range(40, 80)), [100, 12]]
MAX_NEW = 10
_SMALL = ("conv1d.weight", "A_log", "D", "dt_bias", "norm.weight")


def _configs():
    from transformers import GraniteMoeHybridConfig, NemotronHConfig, Qwen3NextConfig

    common = dict(vocab_size=128, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.1)
    # every stored part but the last a whole number of 128-row blocks, as in the released
    # checkpoints (Qwen3-Next-80B: 128-dim key heads; Granite 4.0-H / Nemotron-H: 8192-wide
    # mixers, 1024-row B / C)
    return {
        # DeltaNet key heads of 128 (q, k) and two value heads of 64 each (v, z): 128 rows a part
        "qwen3-next": Qwen3NextConfig(**common, num_hidden_layers=2, head_dim=32,
                                      linear_num_key_heads=2, linear_num_value_heads=4,
                                      linear_key_head_dim=128, linear_value_head_dim=64,
                                      linear_conv_kernel_dim=4, num_experts=4,
                                      num_experts_per_tok=2, intermediate_size=192,
                                      moe_intermediate_size=128,
                                      shared_expert_intermediate_size=128,
                                      layer_types=["linear_attention", "full_attention"]),
        # in_proj [z 128 | x 128 | B 128 | C 128 | dt 4]; the shared MLP is each layer's MLP
        # (its fused gate/up cut with its scales)
        "granite-4.0-h": GraniteMoeHybridConfig(**common, num_hidden_layers=3,
                                                intermediate_size=128,
                                                shared_intermediate_size=128,
                                                num_local_experts=0,
                                                layer_types=["mamba", "attention", "mamba"],
                                                mamba_n_heads=4, mamba_d_head=32,
                                                mamba_n_groups=1, mamba_d_state=128,
                                                mamba_d_conv=4, mamba_expand=1,
                                                mamba_chunk_size=8,
                                                position_embedding_type="rope"),
        # for tensor parallelism: 128 rows a rank of every part (two 128-dim heads, q, k and v;
        # z, x, B and C of the in_proj: two Mamba groups of 128; the MLP) and 128 inputs a rank
        # of each row-parallel layer
        "granite-4.0-h-tp": GraniteMoeHybridConfig(**dict(common, hidden_size=256,
                                                          num_attention_heads=2),
                                                   num_hidden_layers=3, intermediate_size=256,
                                                   shared_intermediate_size=256,
                                                   num_local_experts=0,
                                                   layer_types=["mamba", "attention", "mamba"],
                                                   mamba_n_heads=8, mamba_d_head=32,
                                                   mamba_n_groups=2, mamba_d_state=128,
                                                   mamba_d_conv=4, mamba_expand=1,
                                                   mamba_chunk_size=8,
                                                   position_embedding_type="rope"),
        "nemotron-h": NemotronHConfig(**common, head_dim=32, intermediate_size=192,
                                      layers_block_type=["linear_attention", "full_attention",
                                                         "mlp", "linear_attention"],
                                      mamba_num_heads=4, mamba_head_dim=32, n_groups=1,
                                      ssm_state_size=128, conv_kernel=4, chunk_size=8),
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return checkpoint_maker(tmp_path_factory.mktemp("hybrid-fp8"), _configs(), seed=3)


@pytest.mark.parametrize("arch", ["qwen3-next", "granite-4.0-h", "nemotron-h"])
def test_block_fp8_hybrid_serves_the_dequantized_model(checkpoints, arch):
    assert_serves_dequantized(*checkpoints(arch), PROMPTS, MAX_NEW)


def test_rows_inside_one_block_keep_its_scale():
    """A rank's rows inside one 128-row block (a Mamba dt part: H / T rows) keep that block's
    scale row; rows crossing a block boundary off it are still refused."""
    from types import SimpleNamespace

    from tessellm.quantization.sharding import TPSplit, fp8_block

    layer = SimpleNamespace(quant_name="layers.0.mamba.in_proj", quant_method=None)
    w, s = torch.randn(8, 256), torch.tensor([[1.0, 2.0], [3.0, 4.0]])[:1]
    split = TPSplit(0, 4, 4, 2)
    assert torch.equal(fp8_block(layer, "weight", w, split, (128, 128)), w[4:8])
    assert torch.equal(fp8_block(layer, "weight_scale_inv", s, split, (128, 128)), s)
    with pytest.raises(ValueError, match="does not fall on the fp8 blocks"):
        fp8_block(layer, "weight", torch.randn(256, 256), TPSplit(0, 64, 128, 2), (128, 128))


@pytest.mark.slow
def test_block_fp8_hybrid_tensor_parallel(checkpoints):
    """tensor_parallel_size=2 (gloo): each rank cuts its rows of each stored in_proj part, with
    their block scales, after the mixer cut the parts (and its columns of out_proj): the tokens
    are the one-device model's, which are the dequantized checkpoint's."""
    fp8_dir, deq_dir = checkpoints("granite-4.0-h-tp")
    want = generate(deq_dir, PROMPTS, MAX_NEW)
    assert generate(fp8_dir, PROMPTS, MAX_NEW) == want
    assert generate(fp8_dir, PROMPTS, MAX_NEW, tensor_parallel_size=2, device="cpu") == want


def test_block_fp8_hybrid_keeps_the_recurrent_parameters_dense(checkpoints):
    """The mixers' projections hold fp8 blocks (``in_proj_ba``: bf16 in the checkpoint, dense
    here); conv1d, A_log, dt_bias and the gated norm stay float32 parameters."""
    from tessellm.layers.gated_deltanet import GatedDeltaNet

    model = build(checkpoints("qwen3-next")[0])
    mixer = next(m for m in model.modules() if isinstance(m, GatedDeltaNet))
    assert {s.kind for s in mixer.in_proj_qkvz.segments} == {"fp8_block"}
    assert {s.kind for s in mixer.out_proj.segments} == {"fp8_block"}
    assert {s.kind for s in mixer.in_proj_ba.segments} == {"dense"}
    small = dict(mixer.named_parameters())
    assert {n for n in small if n != "norm.weight"} == {"conv1d.weight", "A_log", "dt_bias"}
    assert all(p.dtype == torch.float32 for p in small.values())


# -- quantization="fp8" on a dense checkpoint ---------------------------------------------------


@pytest.fixture(scope="module")
def granite_moe_dir(tmp_path_factory):
    """Granite 4.0-H with experts beside the shared MLP (two Mamba groups: B and C cut apart).
    Weights of a trained model's scale (0.05): at the parity tests' sharp 0.2, W8A8's error
    flips near-ties as often in a Granite MoE without Mamba layers (0.61 agreement) as here."""
    from tests.models.test_granite_moe_hybrid import granite_hybrid_config
    from tests.models.variant_parity import save_tiny

    return save_tiny(granite_hybrid_config(initializer_range=0.05),
                     str(tmp_path_factory.mktemp("granite4h-fp8")))


def _in_projs(model):
    return {n: m for n, m in model.named_modules()
            if n.endswith(("mamba.in_proj", "linear_attn.in_proj_qkvz", "mixer.in_proj"))}


@pytest.mark.parametrize("arch", ["qwen3-next", "granite-4.0-h", "nemotron-h"])
def test_fp8_on_load_quantizes_each_stored_part_in_place(checkpoints, arch):
    """Each ``in_proj`` of the fp8 model holds the per-row fp8 codes and scales of the dense
    model's weight, rows in the dense model's order (the DeltaNet's regrouped by key head): a
    part cut from the wrong rows would quantize other rows."""
    dense_dir = checkpoints(arch)[1]
    dense, fp8 = build(dense_dir), build(dense_dir, quantization="fp8")
    want, got = _in_projs(dense), _in_projs(fp8)
    assert want and want.keys() == got.keys()
    for name, layer in got.items():
        ref = quantize_fp8(want[name].weight.data)
        codes = torch.cat([s.qweight for s in layer.segments])
        scales = torch.cat([s.scales for s in layer.segments])
        assert torch.equal(codes.float(), ref.qweight.float()), name
        assert torch.equal(scales, ref.scales), name
    for name, param in fp8.named_parameters():
        if name.endswith(_SMALL):
            assert param.dtype == torch.float32
            assert torch.equal(param, dict(dense.named_parameters())[name]), name


def _top1_agreement(path, continuations, **kwargs) -> float:
    score = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    with LLM(path, **{"dtype": "float32", "num_kv_blocks": 64, **kwargs}) as llm:
        outs = llm.generate([{"prompt_token_ids": p + c} for p, c in continuations], score,
                            use_tqdm=False)
    hits = [o.prompt_logprobs[len(p) + j][tok].rank == 1
            for (p, c), o in zip(continuations, outs) for j, tok in enumerate(c)]
    return sum(hits) / len(hits)


def test_fp8_on_load_granite_hybrid_agrees_with_dense(granite_moe_dir):
    """W8A8 (experts, shared MLP, attention, Mamba projections) against float32: the dense
    greedy continuation, teacher-forced, is mostly the fp8 model's first choice too."""
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    with LLM(granite_moe_dir, dtype="float32", num_kv_blocks=64) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    continuations = [(p, list(o.outputs[0].token_ids)) for p, o in zip(PROMPTS, outs)]
    assert _top1_agreement(granite_moe_dir, continuations, quantization="fp8") >= 0.75


def test_schemes_the_hybrid_layers_are_not_built_for_are_refused(checkpoints):
    """GGUF (AWQ / GPTQ checkpoints are served: ``test_hybrid_int4.py``)."""
    with pytest.raises(ValueError, match="does not support quantization gguf yet; they serve "
                                         "int8, fp8, AWQ and GPTQ"):
        LLM(checkpoints("qwen3-next")[1], dtype="float32", quantization="gguf")


# -- on a GPU (benchmarks/hybq_device.sh) -------------------------------------------------------

ON_GPU = torch.cuda.is_available()
# (N, K) of the hybrid layers' projections in the released models: Qwen3-Next-80B-A3B's DeltaNet
# in_proj_qkvz and out_proj, Granite 4.0-H small's Mamba in_proj ([z | x | B | C | dt]: the dt
# part ends mid-block) and out_proj
HYBRID_SHAPES = [(12288, 2048), (2048, 4096), (16768, 4096), (4096, 8192)]


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,k", HYBRID_SHAPES)
def test_cuda_fp8_gemms_at_hybrid_shapes(n, k):
    """The cuda backend's fp8 GEMMs (``TritonQuantOps``: per-channel fp8, W8A16 at decode sizes,
    W8A8 above; block fp8, W8A8 at every size) at the hybrid layers' shapes: the block GEMM
    against its W8A8 oracle, both within e4m3 activation error of the dequantized weight's
    product (bfloat16 activations, as served)."""
    from tessellm.kernels.gemm.quant_ops import TritonQuantOps
    from tessellm.quantization.fp8_block import quantize_fp8_block, w8a8_block_reference

    ops, dev = TritonQuantOps(), torch.device("cuda")
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g) * 0.02
    block_cpu = quantize_fp8_block(w, (128, 128))
    channel, block = quantize_fp8(w).to(dev), quantize_fp8_block(w, (128, 128)).to(dev)
    for m in (1, 8, 64, 300):
        x = (torch.randn(m, k, generator=g)).to(dev, torch.bfloat16)
        for name, seg, got in (("fp8", channel, ops.fp8_mm(x, channel)),
                               ("fp8_block", block, ops.fp8_block_mm(x, block))):
            dense = x.float() @ seg.dequantize().float().t()
            rel = ((got.float() - dense).norm() / dense.norm()).item()
            assert got.shape == (m, n) and rel < 0.05, (name, m, rel)
        # against the W8A8 oracle: fp8 tensor cores sum a K tile in less than float32, and an
        # activation on a rounding edge may take the other e4m3 code, so the whole product is
        # compared by its norm (on an H100: up to 3.1e-3 at 8 rows, 2.2e-3 at 64; a wrong
        # block or scale layout is off by order 1)
        want = w8a8_block_reference(x.float().cpu(), block_cpu)
        got = ops.fp8_block_mm(x.float(), block).cpu()
        assert ((got - want).norm() / want.norm()).item() < 1e-2, m


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_cuda_fp8_hybrids_greedy(checkpoints, granite_moe_dir):
    """Tiny hybrids served on cuda in bfloat16 (the Triton recurrent kernels, fp8 GEMMs, fp8 MoE
    experts): Granite 4.0-H with experts under quantization="fp8" and the block-fp8 Qwen3-Next
    checkpoint agree with their dense model's teacher-forced greedy continuation on cuda."""
    kw = dict(device="cuda", dtype="bfloat16")
    for path, dense, quant in ((granite_moe_dir, granite_moe_dir, "fp8"),
                               (*checkpoints("qwen3-next"), None)):
        params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
        with LLM(dense, num_kv_blocks=64, **kw) as llm:
            outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params,
                                use_tqdm=False)
        continuations = [(p, list(o.outputs[0].token_ids)) for p, o in zip(PROMPTS, outs)]
        agreement = _top1_agreement(path, continuations, quantization=quant, **kw)
        print(f"{path}: top-1 agreement {agreement:.3f}")
        assert agreement >= 0.6, (path, agreement)


def test_nemotron_h_fp8_experts_are_refused_by_name(tmp_path):
    """Nemotron-H's relu2 experts stay in the model dtype: an fp8 expert checkpoint is refused
    naming the tensor (its codes were copied without their scale, then a scale had "no
    place"), while quantization="fp8" on the bf16 checkpoint serves the other layers."""
    from tests.models.test_nemotron_h import nemotron_config
    from tests.models.variant_parity import save_tiny

    dense = save_tiny(nemotron_config(initializer_range=0.05), str(tmp_path / "dense"))
    fp8_dir, _ = write_fp8_per_tensor(dense, str(tmp_path / "fp8"), str(tmp_path / "deq"))
    with pytest.raises(ValueError, match=r"mixer\.experts\.\d+\.\w+_proj\.\w+ is an fp8 "
                                         r"expert's; Nemotron-H's relu2 experts are kept"):
        build(fp8_dir)
    assert len(generate(dense, PROMPTS[:1], 4, quantization="fp8")[0]) == 4
