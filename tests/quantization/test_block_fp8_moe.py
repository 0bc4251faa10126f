"""fp8 MoE checkpoints loaded into the fused MoE path, experts kept fp8 (``layers/moe_fp8.py``):

* block-wise fp8 (Qwen3-30B-A3B-FP8 / DeepSeek-V3 layout, ``weight_scale_inv`` per 128x128
  block under HF's per-expert names): tiny random Qwen3-MoE and DeepSeek-V3 models give, on the
  cpu backend (experts dequantized per touched expert, W8A16), the greedy tokens of the same
  models served from the dequantized checkpoint, and HF transformers gives them too (float32).
  DeepSeek's MLA projections are dequantized at load; its MLPs and experts stay fp8.
* per-tensor fp8 (Mixtral-8x7B-Instruct-v0.1-FP8's AutoFP8 layout: scalar ``weight_scale`` and
  ``input_scale`` per expert projection, ``activation_scheme: static``): every expert holds
  exactly the checkpoint's codes and scales; the attention linears are W8A8 (per token), so the
  model is checked close to the dequantized one rather than token for token.
* the fused MoE op's reference against the cpu op on block scales, and refusals.
"""

from __future__ import annotations

import os

import pytest
import torch

from tessellm import LLM, SamplingParams
from tests.quantization.block_fp8_checkpoint import (assert_serves_dequantized, build,
                                                     checkpoint_maker, generate)
from tests.gpu_set import gpu_when_present

PROMPTS = [[5, 17, 42, 99, 3, 120], [7, 7, 7], list(range(40, 80)), [100, 12]]
MAX_NEW = 12


def _configs():
    from transformers import DeepseekV3Config, MixtralConfig, Qwen3MoeConfig

    common = dict(vocab_size=128, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
                  num_experts_per_tok=2)
    return {
        # experts of 128 (one row block; gate + up = 2 blocks), 8 of them, top-2
        "qwen3-moe": Qwen3MoeConfig(**common, head_dim=32, intermediate_size=192,
                                    moe_intermediate_size=128, num_experts=8, norm_topk_prob=True),
        # layer 0 dense (intermediate 192: a short block), layer 1 MoE with a shared expert;
        # MLA with q_lora; V3's grouped sigmoid routing
        "deepseek-v3": DeepseekV3Config(**dict(common, num_key_value_heads=4),
                                        intermediate_size=192, moe_intermediate_size=128,
                                        n_routed_experts=8, n_shared_experts=1,
                                        first_k_dense_replace=1, kv_lora_rank=32,
                                        q_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                        v_head_dim=16, n_group=4, topk_group=2,
                                        routed_scaling_factor=2.5, initializer_range=0.1),
        # for tensor parallelism: dense MLP, shared and routed experts of 256 (128 a rank)
        "deepseek-v3-tp": DeepseekV3Config(**dict(common, num_key_value_heads=4),
                                           intermediate_size=256, moe_intermediate_size=256,
                                           n_routed_experts=8, n_shared_experts=1,
                                           first_k_dense_replace=1, kv_lora_rank=32,
                                           q_lora_rank=48, qk_nope_head_dim=16,
                                           qk_rope_head_dim=8, v_head_dim=16, n_group=4,
                                           topk_group=2, routed_scaling_factor=2.5,
                                           initializer_range=0.1),
        "mixtral": MixtralConfig(**common, intermediate_size=96, num_local_experts=8),
        # for tensor parallelism: k/v of 256 rows and experts of 256, 128 a rank at T=2
        "qwen3-moe-tp": Qwen3MoeConfig(**dict(common, num_key_value_heads=4), head_dim=64,
                                       intermediate_size=192, moe_intermediate_size=256,
                                       num_experts=8, norm_topk_prob=True),
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return checkpoint_maker(tmp_path_factory.mktemp("fp8-moe"), _configs(), seed=11,
                            per_tensor=("mixtral",))


def _experts(model):
    from tessellm.layers.moe import FusedMoE

    return {n: m for n, m in model.named_modules() if isinstance(m, FusedMoE)}


@pytest.mark.parametrize("arch", ["qwen3-moe", "deepseek-v3"])
def test_block_fp8_moe_serves_the_dequantized_model(checkpoints, arch):
    assert_serves_dequantized(*checkpoints(arch), PROMPTS, MAX_NEW)


@pytest.mark.parametrize("arch", ["qwen3-moe", "deepseek-v3"])
def test_block_fp8_experts_keep_the_checkpoint_codes_and_scales(checkpoints, arch):
    from safetensors.torch import load_file

    from tessellm.quantization.fp8_block import dequantize_block

    fp8_dir, deq_dir = checkpoints(arch)
    stored = load_file(os.path.join(fp8_dir, "model.safetensors"))
    dense = load_file(os.path.join(deq_dir, "model.safetensors"))
    experts = _experts(build(fp8_dir))
    assert experts
    for prefix, moe in experts.items():
        assert moe.w13.dtype == torch.float8_e4m3fn and moe.quant.kind == "fp8_block"
        for e in (0, 5):
            base = f"model.{prefix}.{e}"
            gate = stored[f"{base}.gate_proj.weight"]
            assert torch.equal(moe.w13.data[e, :128].view(torch.uint8), gate.view(torch.uint8))
            assert torch.equal(moe.w13_scale.data[e, 1:],
                               stored[f"{base}.up_proj.weight_scale_inv"])
            down = dequantize_block(moe.w2.data[e], moe.w2_scale.data[e], (128, 128))
            assert torch.equal(down, dense[f"{base}.down_proj.weight"])


def test_per_tensor_fp8_mixtral_experts_are_exact(checkpoints):
    """Each expert projection's scalar scale over its rows; codes as stored."""
    from safetensors.torch import load_file

    fp8_dir, deq_dir = checkpoints("mixtral")
    dense = load_file(os.path.join(deq_dir, "model.safetensors"))
    experts = _experts(build(fp8_dir))
    for prefix, moe in experts.items():
        assert moe.w13.dtype == torch.float8_e4m3fn and moe.quant.kind == "fp8"
        ckpt = f"model.{prefix.replace('.mlp.', '.block_sparse_moe.')}"
        for e in range(8):
            w13 = moe.w13.data[e].float() * moe.w13_scale.data[e][:, None]
            want = torch.cat([dense[f"{ckpt}.{e}.w1.weight"], dense[f"{ckpt}.{e}.w3.weight"]])
            assert torch.equal(w13, want)
            w2 = moe.w2.data[e].float() * moe.w2_scale.data[e][:, None]
            assert torch.equal(w2, dense[f"{ckpt}.{e}.w2.weight"])


def test_per_tensor_fp8_mixtral_serves_close_to_the_dequantized_model(checkpoints):
    """Attention is W8A8 per token (activations rounded to e4m3), experts W8A16: the first
    greedy token of every prompt is the dequantized model's, and the log-probabilities of its
    continuation stay within 0.1 nats."""
    from tests.models.variant_parity import ours

    fp8_dir, deq_dir = checkpoints("mixtral")
    got_tokens, got_lp = ours(fp8_dir, PROMPTS, 6, num_kv_blocks=64)
    want_tokens, _ = ours(deq_dir, PROMPTS, 6, num_kv_blocks=64)
    assert [t[0] for t in got_tokens] == [t[0] for t in want_tokens]
    # the dequantized model scoring the fp8 model's own continuation
    scored = ours(deq_dir, [p + t for p, t in zip(PROMPTS, got_tokens)], 1, num_kv_blocks=64)[1]
    for got, want in zip(got_lp, scored):
        assert torch.allclose(got, want[:len(got)], atol=0.1), (got - want[:len(got)]).abs().max()


def test_fused_moe_block_scales_cpu_matches_reference():
    from tessellm.backends.cpu.moe import fused_moe_grouped
    from tessellm.backends.reference.moe import dequantize_experts, fused_moe_reference
    from tessellm.quantization.fp8_block import quantize_block_tensors

    g = torch.Generator().manual_seed(2)
    e, h, i = 6, 200, 128
    q13, s13 = quantize_block_tensors(torch.randn(e, 2 * i, h, generator=g) / 14, (128, 128))
    q2, s2 = quantize_block_tensors(torch.randn(e, h, i, generator=g) / 11, (128, 128))
    x, logits = torch.randn(9, h, generator=g), torch.randn(9, e, generator=g)
    want = fused_moe_reference(x, logits, q13, q2, 2, "softmax", True, s13, s2,
                               block_shape=(128, 128))
    got = fused_moe_grouped(x, logits, q13, q2, 2, "softmax", True, s13, s2,
                            block_shape=(128, 128))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    dense = fused_moe_reference(x, logits, dequantize_experts(q13, s13, torch.float32, (128, 128)),
                                dequantize_experts(q2, s2, torch.float32, (128, 128)), 2)
    torch.testing.assert_close(want, dense, rtol=1e-5, atol=1e-5)


def test_a_missing_expert_scale_is_refused(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    fp8_dir, _ = checkpoints("qwen3-moe")
    path = tmp_path / "no-scale"
    os.makedirs(path)
    state = load_file(os.path.join(fp8_dir, "model.safetensors"))
    del state["model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"]
    save_file(state, str(path / "model.safetensors"))
    for f in os.listdir(fp8_dir):
        if f.endswith(".json"):
            with open(os.path.join(fp8_dir, f)) as src, open(path / f, "w") as dst:
                dst.write(src.read())
    with pytest.raises(ValueError, match=r"fp8 up weights of expert 3 in layers\.1\.mlp\.experts "
                                         r"but no weight_scale_inv"):
        build(str(path))


def test_block_fp8_moe_tp2_serves_the_one_device_tokens(checkpoints):
    """Each rank holds its 128 rows of every expert's gate and up (and their block scales) and
    128 input columns of its down; T=2 gives T=1's greedy tokens (cpu, gloo)."""
    from tessellm.distributed.parallel_state import TensorParallel
    from tessellm.quantization.fp8_block import dequantize_block

    fp8_dir, _ = checkpoints("qwen3-moe-tp")
    one = _experts(build(fp8_dir))["layers.1.mlp.experts"]
    for rank in range(2):
        part = _experts(build(fp8_dir, tp=TensorParallel(rank, 2)))["layers.1.mlp.experts"]
        rows = slice(rank * 128, (rank + 1) * 128)
        for e in (0, 7):
            w13 = dequantize_block(one.w13.data[e], one.w13_scale.data[e], (128, 128))
            got = dequantize_block(part.w13.data[e], part.w13_scale.data[e], (128, 128))
            assert torch.equal(got, torch.cat([w13[:256][rows], w13[256:][rows]]))
            w2 = dequantize_block(one.w2.data[e], one.w2_scale.data[e], (128, 128))
            got = dequantize_block(part.w2.data[e], part.w2_scale.data[e], (128, 128))
            assert torch.equal(got, w2[:, rows])
    assert (generate(fp8_dir, PROMPTS, MAX_NEW, tensor_parallel_size=2)
            == generate(fp8_dir, PROMPTS, MAX_NEW))


def test_deepseek_v3_fp8_tp2_serves_the_one_device_tokens(checkpoints):
    """MLA dequantized at load and cut by each layer; fp8 MLPs and experts split by blocks."""
    fp8_dir, _ = checkpoints("deepseek-v3-tp")
    assert (generate(fp8_dir, PROMPTS, MAX_NEW, tensor_parallel_size=2)
            == generate(fp8_dir, PROMPTS, MAX_NEW))


def test_block_experts_split_off_a_block_are_refused(checkpoints):
    """Experts of 128 over 2 ranks: 64 rows of gate and of up each, half a block."""
    from tessellm.distributed.parallel_state import TensorParallel

    fp8_dir, _ = checkpoints("qwen3-moe")
    with pytest.raises(ValueError, match=r"intermediate size \(64 at tensor_parallel_size=2\) to "
                                         r"be a multiple of the 128x128 blocks"):
        build(fp8_dir, tp=TensorParallel(0, 2))


def test_block_fp8_experts_split_by_expert(checkpoints):
    """Expert parallelism: each of 2 ranks holds its 4 experts' codes and block scales whole,
    as one device holds them, and the ranks' MoE outputs add up to the one device's."""
    from tessellm.distributed.parallel_state import TensorParallel

    fp8_dir, _ = checkpoints("qwen3-moe-tp")
    one = build(fp8_dir).layers[1].mlp
    x = torch.randn(6, one.gate.weight.shape[1], generator=torch.Generator().manual_seed(3))
    parts = []
    for rank in range(2):
        moe = build(fp8_dir, tp=TensorParallel(rank, 2), expert_parallel=True).layers[1].mlp
        held = slice(4 * rank, 4 * rank + 4)
        for name in ("w13", "w2", "w13_scale", "w2_scale"):
            got, want = getattr(moe.experts, name).data, getattr(one.experts, name).data[held]
            assert torch.equal(got.view(torch.uint8) if got.element_size() == 1 else got,
                               want.view(torch.uint8) if want.element_size() == 1 else want), name
        with torch.no_grad():
            parts.append(moe(x))
    with torch.no_grad():
        torch.testing.assert_close(parts[0] + parts[1], one(x), rtol=1e-5, atol=1e-5)


def test_moe_with_int8_is_refused(checkpoints):
    _, deq_dir = checkpoints("qwen3-moe")
    with pytest.raises(ValueError, match="MoE models quantized with .int8. are not supported"):
        LLM(deq_dir, dtype="float32", quantization="int8")


def test_fp8_on_load_and_dummy_for_moe(checkpoints):
    """quantization='fp8' / 'fp8_block' on a dense MoE checkpoint quantizes the experts as they
    load (per row / per block), and random (dummy) fp8 experts run."""
    fp8_dir, _ = checkpoints("qwen3-moe")
    dense_dir = os.path.join(os.path.dirname(fp8_dir), "qwen3-moe-dense")
    for scheme in ("fp8", "fp8_block"):
        with LLM(dense_dir, dtype="float32", quantization=scheme, num_kv_blocks=64) as llm:
            out = llm.generate([{"prompt_token_ids": PROMPTS[0]}],
                               SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
            assert len(out[0].outputs[0].token_ids) == 4
    with LLM(dense_dir, dtype="float32", quantization="fp8_block", load_format="dummy",
             num_kv_blocks=64) as llm:
        out = llm.generate([{"prompt_token_ids": PROMPTS[0]}],
                           SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 4


@gpu_when_present
@pytest.mark.parametrize("fuse", [True, False])
def test_triton_fused_moe_block_scales_match_reference(fuse):
    """The grouped GEMMs with block scales (on the GPU where there is one, else interpreted),
    SiLU-and-mul in GEMM 1's epilogue or apart, float32: the reference's numbers; the decode
    path is never taken for them."""
    from tessellm.backends.reference.moe import fused_experts_reference, route
    from tessellm.kernels.moe.fused_moe import fused_moe_triton
    from tessellm.quantization.fp8_block import quantize_block_tensors

    g = torch.Generator().manual_seed(4)
    e, h, i = 5, 160, 256  # H: a short block; I: two row blocks of gate and of up
    q13, s13 = quantize_block_tensors(torch.randn(e, 2 * i, h, generator=g) / 12, (128, 128))
    q2, s2 = quantize_block_tensors(torch.randn(e, h, i, generator=g) / 16, (128, 128))
    x, logits = torch.randn(3, h, generator=g), torch.randn(3, e, generator=g)
    weights, ids = route(logits, 2)
    want = fused_experts_reference(x, weights, ids, q13, q2, s13, s2, block_shape=(128, 128))
    tiles = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SILU_MUL=fuse)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the kernels' inputs
    got = fused_moe_triton(*(t.to(dev) for t in (x, weights, ids.to(torch.int32), q13, q2, s13,
                                                 s2)), tiles, block_shape=(128, 128))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
