"""AWQ and GPTQ int4 MoE experts (W4A16, ``layers/moe_int4.py``): tiny random Mixtral and
Qwen3-MoE checkpoints packed the way AutoAWQ / GPTQ store them (random codes, zeros and fp16
scales per group of 32 inputs, ``test_hybrid_int4.write_int4``: every expert projection one
tensor set under HF's names, the router and norms float), served on the cpu backend (float32),
give the greedy tokens HF transformers gives on the *dequantized* checkpoint. The experts keep
the checkpoint's codes (repacked along the inputs); the fused MoE op on int4 experts (the cpu
op and the Triton kernel, interpreted) equals the pure-torch reference; bad checkpoints are
refused with one sentence.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tessellm.backends.reference.moe import dequantize_int4, fused_moe_reference
from tessellm.quantization.int4 import unpack_awq
from tessellm.quantization.packed import pack_int4
from tests.quantization.block_fp8_checkpoint import build, generate
from tests.quantization.int4_checkpoint import random_int4_experts
from tests.gpu_set import gpu_when_present
from tests.quantization.test_hybrid_int4 import _configs as hybrid_configs
from tests.quantization.test_hybrid_int4 import write_int4

PROMPTS = [[5, 17, 42, 99, 3, 120], list(range(40, 60))]
MAX_NEW = 6


def _configs():
    from transformers import (DeepseekV3Config, MixtralConfig, OlmoeConfig, Qwen2MoeConfig,
                              Qwen3MoeConfig)

    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
                  num_experts_per_tok=2, initializer_range=0.1)
    return {
        "mixtral": MixtralConfig(**common, intermediate_size=64, num_local_experts=4),
        "qwen3-moe": Qwen3MoeConfig(**common, head_dim=16, intermediate_size=96,
                                    moe_intermediate_size=64, num_experts=8, norm_topk_prob=True),
        # a shared expert (int4) behind its float sigmoid gate
        "qwen2-moe": Qwen2MoeConfig(**common, intermediate_size=96, moe_intermediate_size=64,
                                    num_experts=4, shared_expert_intermediate_size=64),
        "olmoe": OlmoeConfig(**common, intermediate_size=64, num_experts=4),
        # layer 0 dense, layer 1 MoE with a shared expert; MLA's int4 projections dequantized
        "deepseek-v3": DeepseekV3Config(**dict(common, num_key_value_heads=4),
                                        intermediate_size=96, moe_intermediate_size=64,
                                        n_routed_experts=8, n_shared_experts=1,
                                        first_k_dense_replace=1, kv_lora_rank=32,
                                        q_lora_rank=64, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                        v_head_dim=16, n_group=4, topk_group=2,
                                        routed_scaling_factor=2.5),
        # the hybrid's tiny model with its MoE layers (test_hybrid_int4 keeps dense MLPs)
        "qwen3-next": hybrid_configs()["qwen3-next"],
        # Granite's experts are stacked 3-D parameters, which int4 tools leave float
        "granite-4.0-h": hybrid_configs()["granite-4.0-h"],
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root, made = tmp_path_factory.mktemp("moe-int4"), {}

    def make(arch: str) -> dict:
        if arch not in made:
            torch.manual_seed(3)
            config = _configs()[arch]
            if arch == "qwen3-next":
                config.mlp_only_layers = []
            if arch == "granite-4.0-h":
                config.num_local_experts, config.num_experts_per_tok = 4, 2
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            dense = str(root / f"{arch}-dense")
            model.save_pretrained(dense)
            made[arch] = write_int4(dense, root / arch, extra_packed=("in_proj_ba",))
        return made[arch]

    return make


def _experts(model):
    from tessellm.layers.moe import FusedMoE

    return [m for m in model.modules() if isinstance(m, FusedMoE)]


@pytest.mark.parametrize("arch, fmt", [("mixtral", "awq"), ("qwen3-moe", "gptq"),
                                       ("qwen2-moe", "awq"), ("olmoe", "gptq"),
                                       ("deepseek-v3", "awq"), ("qwen3-next", "gptq"),
                                       ("granite-4.0-h", "awq"),
                                       pytest.param("mixtral", "gptq", marks=pytest.mark.slow),
                                       pytest.param("qwen3-moe", "awq", marks=pytest.mark.slow)])
def test_int4_moe_serves_the_dequantized_model(checkpoints, arch, fmt):
    """Greedy float32 tokens of the int4 checkpoint (cpu backend: experts dequantized per
    touched expert) are HF transformers' on the dequantized checkpoint."""
    from tests.conftest import hf_greedy

    dirs = checkpoints(arch)
    want = hf_greedy(dirs["deq"], PROMPTS, MAX_NEW)
    assert generate(dirs[fmt], PROMPTS, MAX_NEW) == want


@pytest.mark.slow  # ~1 min interpreted; test_triton_int4_fused_moe_matches_reference covers the op
@gpu_when_present
def test_int4_moe_on_the_cuda_backend_kernels(checkpoints):
    """The cuda backend's kernels (Triton, interpreted on host tensors here; on the GPU by
    ``benchmarks/moeint4_device.sh``): int4 experts through the Triton fused MoE give HF's
    greedy tokens on the dequantized checkpoint."""
    from tests.conftest import hf_greedy

    dirs = checkpoints("qwen3-moe")
    want = hf_greedy(dirs["deq"], PROMPTS, MAX_NEW)
    device = os.environ.get("TESSELLM_TEST_DEVICE", "cuda")
    emulate = device == "cuda" and not torch.cuda.is_available()
    assert generate(dirs["awq"], PROMPTS, MAX_NEW, device=device, emulate=emulate) == want


def test_experts_keep_the_checkpoint_codes(checkpoints):
    """Expert 2's up projection of layer 1 holds the AWQ checkpoint's codes (repacked along
    the inputs), zeros and scales; the router stays a float Linear."""
    dirs = checkpoints("qwen3-moe")
    model = build(dirs["awq"])
    moe = _experts(model)[1]
    state = load_file(os.path.join(dirs["awq"], "model.safetensors"))
    name = "model.layers.1.mlp.experts.2.up_proj"
    inter = moe.local
    codes = unpack_awq(state[f"{name}.qweight"]).to(torch.int32)  # [K, N]
    assert moe.w13.dtype == torch.int32
    assert torch.equal(moe.w13[2, inter:], pack_int4(codes).t())
    assert torch.equal(moe.w13_zeros[2, inter:], unpack_awq(state[f"{name}.qzeros"]).t())
    assert torch.equal(moe.w13_scale[2, inter:], state[f"{name}.scales"].float().t())
    deq = load_file(os.path.join(dirs["deq"], "model.safetensors"))
    got = dequantize_int4(moe.w13[2], moe.w13_scale[2], moe.w13_zeros[2], torch.float32)
    torch.testing.assert_close(got[inter:], deq[f"{name}.weight"], rtol=0, atol=0)
    assert model.layers[1].mlp.gate.weight.dtype == torch.float32


@pytest.mark.parametrize("tokens, fuse", [(1, True), (5, False), (33, True)])
@pytest.mark.parametrize("group13, group2, zeros", [(32, 16, True), (64, 32, False)])
@gpu_when_present
def test_triton_int4_fused_moe_matches_reference(tokens, fuse, group13, group2, zeros):
    """The Triton grouped GEMMs (on the GPU where there is one, else interpreted) dequantize
    int4 tiles (zero codes, or 8 without) as the reference does, SiLU-and-mul in GEMM 1's
    epilogue or apart: float32 equal to rounding, through ``fused_moe`` (its own tiles and
    routing) and ``fused_moe_triton`` (the routing given)."""
    pytest.importorskip("triton")
    from tessellm.backends.reference.moe import route
    from tessellm.kernels.moe import fused_moe, fused_moe_triton

    e, h, i = 8, 64, 32
    q13, s13, z13 = random_int4_experts(e, 2 * i, h, group13, seed=tokens)
    q2, s2, z2 = random_int4_experts(e, h, i, group2, seed=tokens + 1)
    if not zeros:
        z13 = z2 = None
    g = torch.Generator().manual_seed(tokens + 2)
    x, logits = torch.randn(tokens, h, generator=g), torch.randn(tokens, e, generator=g)
    want = fused_moe_reference(x, logits, q13, q2, 2, "softmax", True, s13, s2, int4=True,
                               w13_zeros=z13, w2_zeros=z2)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    to = (lambda t: None if t is None else t.to(dev))  # noqa: E731
    kw = dict(int4=True, w13_zeros=to(z13), w2_zeros=to(z2))
    experts = [to(t) for t in (q13, q2, s13, s2)]
    got = fused_moe(to(x), to(logits), *experts[:2], 2, "softmax", True, *experts[2:], **kw)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    weights, ids = route(logits, 2)
    tiles = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SILU_MUL=fuse)
    got = fused_moe_triton(to(x), to(weights), to(ids.to(torch.int32)), *experts, tiles, **kw)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tokens, inter, group13, group2, zeros, dtype", [
    (1, 32, 32, 16, True, torch.float32),     # a K step spans groups: a scale a word
    (2, 40, 64, 8, False, torch.float32),     # 5 words a down row: a masked last step
    (4, 64, 128, 64, True, torch.bfloat16)])  # a K step inside one group: a scale a row
@gpu_when_present
def test_triton_int4_moe_decode_matches_reference(tokens, inter, group13, group2, zeros, dtype):
    """The int4 decode kernels (``kernels/moe/decode_int4.py``: packed words streamed, nibbles
    unpacked in registers, a word's products scaled once), which ``fused_moe_triton`` takes up
    to ``DECODE_MAX_TOKENS`` tokens: float32 equal to the reference to reassociation, bf16
    activations (float16 scales) to bf16 rounding; other ranks' experts (``expert_map``)
    contribute nothing."""
    pytest.importorskip("triton")
    from tessellm.backends.reference.moe import fused_experts_reference, route
    from tessellm.kernels.moe import fused_moe, fused_moe_triton
    from tessellm.kernels.moe.decode_int4 import fused_moe_int4_decode

    e, h = 8, 128
    q13, s13, z13 = random_int4_experts(e, 2 * inter, h, group13, seed=tokens)
    q2, s2, z2 = random_int4_experts(e, h, inter, group2, seed=tokens + 1)
    if dtype != torch.float32:
        s13, s2 = s13.half(), s2.half()
    if not zeros:
        z13 = z2 = None
    g = torch.Generator().manual_seed(tokens + 2)
    x, logits = torch.randn(tokens, h, generator=g).to(dtype), torch.randn(tokens, e, generator=g)
    weights, ids = route(logits, 2)
    kw = dict(int4=True, w13_zeros=z13, w2_zeros=z2)
    want = fused_experts_reference(x, weights, ids, q13, q2, s13, s2, **kw)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    to = (lambda t: None if t is None else t.to(dev))  # noqa: E731
    experts = [to(t) for t in (q13, q2, s13, s2)]
    kw_dev = dict(int4=True, w13_zeros=to(z13), w2_zeros=to(z2))
    ids32 = to(ids.to(torch.int32))
    if tokens == 1:  # other tiles: 4 rows a program of the up kernel, 1 of the down one
        got = fused_moe_int4_decode(to(x), to(weights), ids32, *experts, to(z13), to(z2),
                                    up_rows=4, down_rows=1)
        torch.testing.assert_close(got.cpu(), want, **tol)
    got = fused_moe_int4_decode(to(x), to(weights), ids32, *experts, to(z13), to(z2))
    torch.testing.assert_close(got.cpu(), want, **tol)
    # fused_moe_triton at decode sizes is this path, and fused_moe (routing first) with it
    assert torch.equal(fused_moe_triton(to(x), to(weights), ids32, *experts, **kw_dev), got)
    routed = fused_moe(to(x), to(logits), *experts[:2], 2, "softmax", True, *experts[2:],
                       **kw_dev)
    torch.testing.assert_close(routed.cpu(), want, **tol)
    # expert parallelism: this rank holds experts 0-3 of 8 (local ids 0-3), as the layer calls
    expert_map = torch.tensor([0, 1, 2, 3, -1, -1, -1, -1], dtype=torch.int32)
    local = [t[:4] if t is not None else None for t in (q13, q2, s13, s2, z13, z2)]
    want = fused_experts_reference(x, weights, ids, *local[:4], int4=True, w13_zeros=local[4],
                                   w2_zeros=local[5], expert_map=expert_map)
    got = fused_moe_triton(to(x), to(weights), ids32, *[to(t) for t in local[:4]], int4=True,
                           w13_zeros=to(local[4]), w2_zeros=to(local[5]),
                           expert_map=to(expert_map))
    torch.testing.assert_close(got.cpu(), want, **tol)


def _rewrite(src: str, dst, drop=(), config_changes=None) -> str:
    os.makedirs(dst, exist_ok=True)
    state = load_file(os.path.join(src, "model.safetensors"))
    for name in drop:
        del state[name]
    save_file(state, os.path.join(dst, "model.safetensors"))
    for f in os.listdir(src):
        if f.endswith(".json"):
            with open(os.path.join(src, f)) as a:
                data = json.load(a)
            if f == "config.json" and config_changes:
                data["quantization_config"].update(config_changes)
            with open(os.path.join(dst, f), "w") as b:
                json.dump(data, b)
    return str(dst)


def test_a_missing_expert_qzeros_is_refused(checkpoints, tmp_path):
    path = _rewrite(checkpoints("mixtral")["awq"], tmp_path / "no-zeros",
                    drop=["model.layers.0.block_sparse_moe.experts.3.w3.qzeros"])
    with pytest.raises(ValueError, match=r"The AWQ checkpoint has no qzeros for the up projection "
                                         r"of expert 3 in layers\.0\.mlp\.experts; is it "
                                         r"complete\?"):
        build(path)


_GATE, _UP = ("gate_proj", "w1"), ("up_proj", "w3")


def _act_order(dirs: dict, root, seed: int = 5) -> dict:
    """``{"gptq": dir, "deq": dir}``: the GPTQ checkpoint of ``dirs`` made act-order
    (``desc_act``) on every expert projection: each takes a random order of its inputs
    (``g_idx[order] = arange(K) // group``, as GPTQ writes it; an expert's gate and up share
    one, as they share their inputs), its codes, zeros and scales kept, and the dequantized
    checkpoint rewritten to match (``W[:, k] = (q[k] - zero[g_idx[k]]) * scale[g_idx[k]]``)."""
    from tessellm.quantization.int4 import unpack_gptq_zeros
    from tessellm.quantization.packed import unpack_int4

    g = torch.Generator().manual_seed(seed)
    quant = load_file(os.path.join(dirs["gptq"], "model.safetensors"))
    dense = load_file(os.path.join(dirs["deq"], "model.safetensors"))
    orders = {}
    for key in sorted(quant):
        if ".experts." not in key or not key.endswith(".g_idx"):
            continue
        name = key[:-len(".g_idx")]
        base, proj = name.rsplit(".", 1)
        k = quant[key].numel()
        group = k // quant[f"{name}.scales"].shape[0]
        shared = (base, "gate_up") if proj in _GATE + _UP else (base, proj)
        order = orders.setdefault(shared, torch.randperm(k, generator=g))
        g_idx = torch.empty(k, dtype=torch.long)
        g_idx[order] = torch.arange(k) // group
        quant[key] = g_idx.to(torch.int32)
        q = unpack_int4(quant[f"{name}.qweight"]).long()  # [K, N]
        z = unpack_gptq_zeros(quant[f"{name}.qzeros"]).long() + 1  # (GPTQ v1: zero - 1)
        s = quant[f"{name}.scales"].float()
        dense[f"{name}.weight"] = ((q - z[g_idx]) * s[g_idx]).t().contiguous()
    out = {"gptq": _rewrite(dirs["gptq"], root / "gptq", config_changes={"desc_act": True}),
           "deq": _rewrite(dirs["deq"], root / "deq")}
    save_file(quant, os.path.join(out["gptq"], "model.safetensors"))
    save_file(dense, os.path.join(out["deq"], "model.safetensors"))
    return out


@pytest.mark.parametrize("arch", ["qwen3-moe", pytest.param("mixtral", marks=pytest.mark.slow)])
def test_gptq_act_order_experts_serve_the_dequantized_model(checkpoints, arch, tmp_path):
    """GPTQ act-order experts (each projection's groups spread over its inputs): inputs sorted
    by group at load, the down projection's order folded into w13's rows, the gate / up order
    kept as ``w13_perm`` (cpu backend, float32): HF's greedy tokens on the dequantized
    checkpoint."""
    from tests.conftest import hf_greedy

    dirs = _act_order(checkpoints(arch), tmp_path)
    moe = _experts(build(dirs["gptq"]))[-1]
    assert moe.w13_perm is not None and moe.w13_perm.shape == (moe.w13.shape[0], 64)
    assert not torch.equal(moe.w13_perm[0].long(), torch.arange(64))
    assert generate(dirs["gptq"], PROMPTS, MAX_NEW) == hf_greedy(dirs["deq"], PROMPTS, MAX_NEW)


@pytest.mark.slow  # ~1 min interpreted; the op is covered by test_triton_int4_act_order_*
@gpu_when_present
def test_gptq_act_order_experts_on_the_cuda_backend_kernels(checkpoints, tmp_path):
    """The same act-order checkpoint through the cuda backend's Triton fused MoE (decode
    kernels and grouped GEMMs gathering x through ``w13_perm``): HF's greedy tokens."""
    from tests.conftest import hf_greedy

    dirs = _act_order(checkpoints("qwen3-moe"), tmp_path)
    device = os.environ.get("TESSELLM_TEST_DEVICE", "cuda")
    emulate = device == "cuda" and not torch.cuda.is_available()
    assert (generate(dirs["gptq"], PROMPTS, MAX_NEW, device=device, emulate=emulate)
            == hf_greedy(dirs["deq"], PROMPTS, MAX_NEW))


@pytest.mark.parametrize("tokens", [2, 20])
@gpu_when_present
def test_triton_int4_act_order_matches_reference(tokens):
    """``w13_perm`` through the Triton kernels (the decode kernels at 2 tokens, the grouped
    GEMMs at 20) equals the reference, which equals the plain product on the dequantized
    weights with their inputs put back in order."""
    pytest.importorskip("triton")
    from tessellm.backends.reference.moe import fused_experts_reference, route
    from tessellm.kernels.moe import fused_moe_triton

    e, h, i = 8, 64, 32
    q13, s13, z13 = random_int4_experts(e, 2 * i, h, 32, seed=tokens)
    q2, s2, z2 = random_int4_experts(e, h, i, 16, seed=tokens + 1)
    g = torch.Generator().manual_seed(tokens + 2)
    perm = torch.stack([torch.randperm(h, generator=g) for _ in range(e)]).to(torch.int32)
    x, logits = torch.randn(tokens, h, generator=g), torch.randn(tokens, e, generator=g)
    weights, ids = route(logits, 2)
    kw = dict(int4=True, w13_zeros=z13, w2_zeros=z2)
    want = fused_experts_reference(x, weights, ids, q13, q2, s13, s2, w13_perm=perm, **kw)
    # the oracle's meaning: w13[e] in the checkpoint's input order is W[:, perm^-1]
    w13 = dequantize_int4(q13, s13, z13, torch.float32)
    unsorted = torch.empty_like(w13)
    for ex in range(e):
        unsorted[ex][:, perm[ex].long()] = w13[ex]
    plain = fused_experts_reference(x, weights, ids, unsorted,
                                    dequantize_int4(q2, s2, z2, torch.float32))
    torch.testing.assert_close(want, plain, rtol=1e-5, atol=1e-5)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    to = (lambda t: t.to(dev))  # noqa: E731
    got = fused_moe_triton(to(x), to(weights), to(ids.to(torch.int32)),
                           *[to(t) for t in (q13, q2, s13, s2)], int4=True,
                           w13_zeros=to(z13), w2_zeros=to(z2), w13_perm=to(perm))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


def test_gptq_act_order_gate_and_up_in_different_orders_are_refused(checkpoints, tmp_path):
    dirs = checkpoints("qwen3-moe")
    path = _rewrite(dirs["gptq"], tmp_path / "act-order")
    state = load_file(os.path.join(path, "model.safetensors"))
    name = "model.layers.0.mlp.experts.1.gate_proj.g_idx"
    state[name] = state[name].flip(0).contiguous()
    save_file(state, os.path.join(path, "model.safetensors"))
    with pytest.raises(ValueError, match=r"The gate and up projections of expert 1 in "
                                         r"layers\.0\.mlp\.experts have different GPTQ "
                                         r"act-order g_idx; .*desc_act=false"):
        build(path)


def test_gptq_act_order_experts_cut_across_ranks_are_refused(checkpoints, tmp_path):
    """Tensor parallelism without expert parallelism would cut an act-order expert's
    intermediate size: refused, naming the way out (the engine refuses desc_act checkpoints
    under tensor parallelism before loading; this is a config saying desc_act=false over
    act-order experts); expert parallelism keeps experts whole."""
    from tessellm.distributed.parallel_state import TensorParallel

    path = _act_order(checkpoints("qwen3-moe"), tmp_path)["gptq"]
    path = _rewrite(path, tmp_path / "says-no-act-order", config_changes={"desc_act": False})
    with pytest.raises(ValueError, match=r"is GPTQ act-order \(desc_act\) and "
                                         r"tensor_parallel_size=2 would cut .*"
                                         r"enable_expert_parallel"):
        build(path, tp=TensorParallel(0, 2))
    ep = _experts(build(path, tp=TensorParallel(1, 2), expert_parallel=True))[-1]
    assert ep.w13_perm is not None and ep.w13_perm.shape[0] == 4


def test_modules_to_not_convert_keeps_a_layers_experts_float(checkpoints, tmp_path):
    """Experts the AWQ config lists in modules_to_not_convert load as float (stored as
    ``.weight``); a config naming only some of one layer's experts is refused."""
    dirs = checkpoints("mixtral")
    state = load_file(os.path.join(dirs["awq"], "model.safetensors"))
    deq = load_file(os.path.join(dirs["deq"], "model.safetensors"))
    prefix = "model.layers.1.block_sparse_moe.experts."
    for name in [n for n in state if n.startswith(prefix)]:
        del state[name]
    state.update({n: t for n, t in deq.items() if n.startswith(prefix)})
    path = _rewrite(dirs["awq"], tmp_path / "skip",
                    config_changes={"modules_to_not_convert": ["gate", "layers.1.block_sparse_moe"]})
    save_file(state, os.path.join(path, "model.safetensors"))
    experts = _experts(build(path))
    assert experts[0].w13.dtype == torch.int32 and experts[1].w13.dtype == torch.float32
    assert generate(path, PROMPTS[:1], 3) == generate(dirs["deq"], PROMPTS[:1], 3)
    path = _rewrite(path, tmp_path / "partial",
                    config_changes={"modules_to_not_convert": ["experts.0"]})
    with pytest.raises(ValueError, match="leaves some expert projections of one layer "
                                         "unquantized"):
        build(path)


def test_dummy_weights_quantize_the_experts(checkpoints):
    """load_format="dummy" on an AWQ checkpoint: random experts quantized round-to-nearest in
    the int4 layout (their dequantized values within the uniform range, up to rounding), no tensor awaited."""
    from tessellm.backends.reference.moe import dequantize_int4

    moe = _experts(build(checkpoints("qwen3-moe")["awq"], load_format="dummy"))[0]
    w = dequantize_int4(moe.w2, moe.w2_scale, moe.w2_zeros, torch.float32)
    assert w.shape == (8, 64, 64) and 0.01 < w.abs().max() < 0.025 and not moe.awaiting_scale


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_ranks_hold_their_part_of_the_int4_experts(checkpoints, fmt):
    """Tensor parallelism (T=2): each rank holds its 32 rows of every expert's gate and up and
    the 32 input columns (one group) of its down, with their scales and zeros, as the one-device
    experts; expert parallelism: each rank holds its 4 experts whole."""
    from tessellm.distributed.parallel_state import TensorParallel

    path = checkpoints("qwen3-moe")[fmt]
    one = _experts(build(path))[1]
    deq = (lambda m, name, e: dequantize_int4(  # noqa: E731
        getattr(m, name)[e], getattr(m, f"{name}_scale")[e], getattr(m, f"{name}_zeros")[e],
        torch.float32))
    for rank in range(2):
        part = _experts(build(path, tp=TensorParallel(rank, 2)))[1]
        rows = slice(rank * 32, (rank + 1) * 32)
        for e in (0, 7):
            w13 = deq(one, "w13", e)
            assert torch.equal(deq(part, "w13", e), torch.cat([w13[:64][rows], w13[64:][rows]]))
            assert torch.equal(deq(part, "w2", e), deq(one, "w2", e)[:, rows])
        ep = _experts(build(path, tp=TensorParallel(rank, 2), expert_parallel=True))[1]
        for local in (0, 3):
            assert torch.equal(deq(ep, "w13", local), deq(one, "w13", 4 * rank + local))
            assert torch.equal(deq(ep, "w2", local), deq(one, "w2", 4 * rank + local))


def test_dense_layers_left_unquantized_serve_float(checkpoints, tmp_path):
    """An int4 checkpoint whose modules_to_not_convert leaves layer 0's attention float (stored
    as ``.weight``, q/k/v fused in one layer here): those layers keep dense segments, and the
    model gives HF's tokens on the dequantized checkpoint."""
    from tessellm.quantization.packed import DenseWeight
    from tests.conftest import hf_greedy

    dirs = checkpoints("qwen3-moe")
    state = load_file(os.path.join(dirs["gptq"], "model.safetensors"))
    deq = load_file(os.path.join(dirs["deq"], "model.safetensors"))
    prefix = "model.layers.0.self_attn."
    for name in [n for n in state if n.startswith(prefix) and "norm" not in n]:
        del state[name]
    state.update({n: t for n, t in deq.items() if n.startswith(prefix)})
    path = _rewrite(dirs["gptq"], tmp_path / "float-attn",
                    config_changes={"modules_to_not_convert": ["model.layers.0.self_attn"]})
    save_file(state, os.path.join(path, "model.safetensors"))
    attn = build(path).layers[0].self_attn
    assert all(isinstance(s, DenseWeight) for s in attn.qkv_proj.segments)
    assert generate(path, PROMPTS, MAX_NEW) == hf_greedy(dirs["deq"], PROMPTS, MAX_NEW)


def test_a_rank_slice_across_two_groups_is_refused():
    """Under tensor parallelism a rank's inputs of the down projection smaller than a group must
    lie in one group (it keeps one scale per row): 96 inputs, groups of 32, 4 ranks of 24 would
    give rank 1 inputs 24..47 (groups 0 and 1) with group 0's scale alone."""
    from types import SimpleNamespace

    from tessellm.layers import moe_int4

    quant = SimpleNamespace(group_size=32)
    for local, size in ((24, 4), (40, 3)):  # 96 / 4; 120 / 3 (40 = a group and a third)
        moe = SimpleNamespace(local=local, tp=SimpleNamespace(size=size), sliced=True)
        with pytest.raises(ValueError, match="multiple of 8 and of the group size 32 .or to divide it"):
            moe_int4.allocate(moe, quant, num_experts=2, hidden=64)
    for local, size in ((16, 4), (32, 2), (64, 1)):  # whole groups, or a part of one group
        moe = SimpleNamespace(local=local, tp=SimpleNamespace(size=size), sliced=True)
        moe_int4.allocate(moe, quant, num_experts=2, hidden=64)
        assert moe.w2_scale.shape == (2, 64, max(1, local // 32))


def test_an_older_plugins_own_fused_experts_gets_no_w13_perm():
    """A plugin ops class of API 19 subclassing ``ReferenceOps`` with its own ``fused_experts``
    (declaring int4 experts, which it takes) never saw API 20's ``w13_perm``: it does not
    inherit the reference's act-order declaration, so act-order experts run the reference loop
    instead of handing it a keyword it does not know (or would drop, silently wrong)."""
    from tessellm.backends.reference.moe import fused_experts_reference, fused_moe_reference
    from tessellm.backends.reference.ops import ReferenceOps
    from tessellm.layers.moe import FusedMoE
    from tessellm.layers.moe_fp8 import ExpertQuant

    class Api19Ops(ReferenceOps):
        fused_moe_int4 = True

        def fused_experts(self, hidden, topk_weights, topk_ids, w13, w2, w13_scale=None,
                          w2_scale=None, *, int4=False, w13_zeros=None, w2_zeros=None):
            return fused_experts_reference(hidden, topk_weights, topk_ids, w13, w2, w13_scale,
                                           w2_scale, int4=int4, w13_zeros=w13_zeros,
                                           w2_zeros=w2_zeros)

    ops = Api19Ops()
    assert ops.fused_moe_int4 and not ops.fused_moe_int4_act_order
    assert not ops.fused_moe_expert_map and ops.fused_moe_activations == ("silu",)
    moe = FusedMoE(4, 64, 32, 2, ops, quant=ExpertQuant("gptq", group_size=32))
    assert moe._experts == ops.fused_experts  # plain int4 experts: the plugin's op
    moe.w13_perm = torch.arange(64, dtype=torch.int32).repeat(4, 1)
    moe.act_order_loaded()
    assert moe._experts is fused_experts_reference and moe._moe is fused_moe_reference
    # the reference's own declarations stand for a subclass that replaces neither op
    assert type("Plain", (ReferenceOps,), {})().fused_moe_int4_act_order
