"""bitsandbytes 4-bit MoE experts (``layers/moe_bnb.py``): tiny random Mixtral and Qwen3-MoE
checkpoints whose every linear (experts and routers too) bitsandbytes quantized on the CPU
(``bnb_checkpoint.write_bnb_linears``), served on the cpu backend in float32, give HF
transformers' greedy tokens on the dequantized checkpoint; the experts stay packed (4 bits a
weight, nothing dense); a dense checkpoint with ``quantization="bitsandbytes"`` quantizes its
experts to NF4 as bitsandbytes does; two tensor-parallel ranks generate as one device; bad
input is refused with one sentence. Ops declaring ``fused_moe_bnb4`` (plugin API 26: every
in-tree backend's) get the packed codes (the Triton ops' decode kernels read them); others keep
the layer's dense path (``moe_bnb.dense_experts``).
"""

from __future__ import annotations

import pytest
import torch

from tessellm.layers.moe import FusedMoE
from tests.gpu_set import ON_GPU
from tests.quantization.block_fp8_checkpoint import build, generate

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
        "qwen3-moe": Qwen3MoeConfig(**common, head_dim=16, intermediate_size=128,
                                    moe_intermediate_size=64, num_experts=8, norm_topk_prob=True),
        # a shared expert (4-bit linears) behind its sigmoid gate; every cut input count
        # 128: two ranks hold whole blocks of 64
        "qwen2-moe": Qwen2MoeConfig(**dict(common, hidden_size=128), intermediate_size=256,
                                    moe_intermediate_size=128, num_experts=4,
                                    shared_expert_intermediate_size=128),
        "olmoe": OlmoeConfig(**common, intermediate_size=64, num_experts=4),
        # layer 0 dense, layer 1 MoE with a shared expert; MLA's projections 4-bit too
        "deepseek-v3": DeepseekV3Config(**dict(common, num_key_value_heads=4),
                                        intermediate_size=128, moe_intermediate_size=64,
                                        n_routed_experts=8, n_shared_experts=1,
                                        first_k_dense_replace=1, kv_lora_rank=64,
                                        q_lora_rank=64, qk_nope_head_dim=16, qk_rope_head_dim=16,
                                        v_head_dim=16, n_group=4, topk_group=2,
                                        routed_scaling_factor=2.5),
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``make(arch, quant_type, double_quant, skip)``: ``(dense, bnb, dequantized)`` dirs
    (the bitsandbytes package, the ``[test]`` extra; skipped without it)."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from tests.quantization.bnb_checkpoint import write_bnb_linears

    root, made = tmp_path_factory.mktemp("bnb-moe"), {}

    def make(arch: str, quant_type: str = "nf4", double_quant: bool = True, skip: tuple = ()):
        key = (arch, quant_type, double_quant, skip)
        if key not in made:
            dense = root / f"{arch}-dense"
            if not dense.exists():
                torch.manual_seed(5)
                model = AutoModelForCausalLM.from_config(_configs()[arch], dtype=torch.float32)
                model.save_pretrained(str(dense))
            tag = "-".join(map(str, key[:3] + skip))
            made[key] = (str(dense),) + write_bnb_linears(
                str(dense), str(root / f"{tag}-bnb"), str(root / f"{tag}-deq"), quant_type,
                double_quant, skip)
        return made[key]

    return make


def _experts(model) -> list[FusedMoE]:
    return [m for m in model.modules() if isinstance(m, FusedMoE)]


@pytest.mark.parametrize("arch, quant_type, double_quant",
                         [("mixtral", "nf4", True), ("qwen3-moe", "fp4", False),
                          ("qwen2-moe", "nf4", False), ("olmoe", "nf4", True),
                          ("deepseek-v3", "nf4", True)])
def test_bnb_moe_serves_the_dequantized_model(checkpoints, arch, quant_type, double_quant):
    """Greedy float32 tokens of the bnb checkpoint (the cpu ops' bnb4 variant: each touched
    expert dequantized) are HF transformers' on the dequantized checkpoint."""
    from tests.conftest import hf_greedy

    _, bnb_dir, deq_dir = checkpoints(arch, quant_type, double_quant)
    assert generate(bnb_dir, PROMPTS, MAX_NEW) == hf_greedy(deq_dir, PROMPTS, MAX_NEW)


def test_experts_the_checkpoint_skips_stay_float(checkpoints):
    """``llm_int8_skip_modules`` naming one layer's experts (and the routers): that layer's
    experts load float beside the other layer's 4-bit ones, HF's tokens on the dequantized
    checkpoint."""
    from tests.conftest import hf_greedy

    _, bnb_dir, deq_dir = checkpoints("qwen3-moe", skip=("gate", "model.layers.1.mlp.experts"))
    kinds = [None if m.quant is None else m.quant.kind for m in _experts(build(bnb_dir))]
    assert kinds == ["bnb4", None]
    assert generate(bnb_dir, PROMPTS, MAX_NEW) == hf_greedy(deq_dir, PROMPTS, MAX_NEW)


def test_bnb_experts_stay_packed(checkpoints):
    """Each layer's experts hold the checkpoint's codes (two a byte) and float32 absmaxes, and
    dequantize to the dequantized checkpoint's weights; no float expert weight is kept."""
    from safetensors.torch import load_file

    from tessellm.layers import moe_bnb

    _, bnb_dir, deq_dir = checkpoints("mixtral")
    model = build(bnb_dir)
    deq = load_file(f"{deq_dir}/model.safetensors")
    for index, moe in enumerate(_experts(model)):
        assert moe.w13.dtype == moe.w2.dtype == torch.uint8
        assert moe.w13.shape == (4, 128, 32) and moe.w13_absmax.shape == (4, 128, 1)
        every = torch.arange(4)
        w13 = moe_bnb.dequantize(moe.w13, moe.w13_absmax, moe.code, every, torch.float32)
        w2 = moe_bnb.dequantize(moe.w2, moe.w2_absmax, moe.code, every, torch.float32)
        for e in range(4):
            prefix = f"model.layers.{index}.block_sparse_moe.experts.{e}"
            want13 = torch.cat([deq[f"{prefix}.w1.weight"], deq[f"{prefix}.w3.weight"]])
            assert torch.equal(w13[e], want13)
            assert torch.equal(w2[e], deq[f"{prefix}.w2.weight"])
        assert all(not p.is_floating_point() or p.numel() < moe.w13.numel()
                   for p in moe.parameters())


def _bnb_moe(dense13, dense2, **kw) -> FusedMoE:
    """A ``FusedMoE`` of bnb 4-bit experts quantized from ``dense13`` / ``dense2`` (its local
    ones: ``kw`` may ask for expert parallelism); the dense tensors become their dequantized
    values in place."""
    from tessellm.layers.moe_fp8 import ExpertQuant
    from tessellm.quantization.bnb import quantize_bnb4

    moe = FusedMoE(8, 64, 64, 2, ops=None, quant=ExpertQuant("bnb4", group_size=64), **kw)
    for e in range(8):
        for name, dense in (("w13", dense13), ("w2", dense2)):
            seg = quantize_bnb4(dense[e])
            dense[e] = seg.dequantize()
            if e in moe.expert_ids:
                row = e - moe.expert_ids.start
                getattr(moe, name).data[row] = seg.qweight
                getattr(moe, f"{name}_absmax").data[row] = seg.absmax.view(dense.shape[1], -1)
    return moe


def test_routed_experts_only_dequantized():
    """A step dequantizes its routed experts (padded to min(E, T*k), no host sync) and the
    product equals the reference loop on the dense experts; under expert parallelism a rank's
    output is the reference's over its own experts."""
    from tessellm.backends.reference.moe import fused_moe_reference, route
    from tessellm.distributed.parallel_state import TensorParallel
    from tessellm.layers import moe_bnb

    torch.manual_seed(0)
    dense13, dense2 = torch.randn(8, 128, 64) * 0.1, torch.randn(8, 64, 64) * 0.1
    moe = _bnb_moe(dense13, dense2)
    weights, ids = route(torch.randn(1, 8), 2)
    _, local, w13, _ = moe_bnb.dense_experts(moe, weights, ids, torch.float32)
    assert w13.shape[0] == 2 and torch.equal(w13[local[0]], dense13[ids[0]])
    rank1 = _bnb_moe(dense13.clone(), dense2.clone(), tp=TensorParallel(rank=1, size=2),
                     expert_parallel=True)  # experts 4..7
    for tokens in (1, 3, 20):
        x, logits = torch.randn(tokens, 64), torch.randn(tokens, 8)
        want = fused_moe_reference(x, logits, dense13, dense2, 2)
        torch.testing.assert_close(moe(x, logits), want, rtol=0, atol=1e-6)
        want = fused_moe_reference(x, logits, dense13[4:], dense2[4:], 2,
                                   expert_map=rank1.expert_map)
        torch.testing.assert_close(rank1(x, logits), want, rtol=0, atol=1e-6)


def _quantized(e: int, n: int, k: int, seed: int):
    """``(codes [e, n, k/2], absmax [e, n, k/64], dequantized [e, n, k])`` of random experts
    quantized to NF4 as bitsandbytes does."""
    from tessellm.quantization.bnb import quantize_bnb4

    torch.manual_seed(seed)
    segs = [quantize_bnb4(w) for w in torch.randn(e, n, k) * 0.1]
    return (torch.stack([s.qweight for s in segs]),
            torch.stack([s.absmax.view(n, -1) for s in segs]),
            torch.stack([s.dequantize() for s in segs]))


def _layer(ops, parts13, parts2, **kw) -> FusedMoE:
    """A bnb4 ``FusedMoE`` of 8 experts (H 64) holding the given codes and absmaxes (its
    rank's part where ``kw`` asks for tensor or expert parallelism)."""
    from tessellm.layers.moe_fp8 import ExpertQuant

    moe = FusedMoE(8, 64, kw.pop("intermediate", 64), 2, ops=ops,
                   quant=ExpertQuant("bnb4", group_size=64), **kw)
    for name, (codes, absmax) in (("w13", parts13), ("w2", parts2)):
        getattr(moe, name).data.copy_(codes)
        getattr(moe, f"{name}_absmax").data.copy_(absmax)
    return moe


@pytest.mark.interpreted
@pytest.mark.parametrize("tokens", [1, 20])
def test_packed_experts_reach_ops_that_declare_bnb4(tokens, monkeypatch):
    """Ops declaring ``fused_moe_bnb4`` (the Triton ops, interpreted on host tensors) get the
    packed codes, no dense copy: at 1 token their decode kernels read them, at 20 the routed
    experts are dequantized for the grouped GEMMs; the reference on the dequantized experts,
    whole, and at 1 token under expert parallelism (rank 1: experts 4..7) and tensor
    parallelism (two ranks' partial sums, each expert's intermediate rows cut in whole
    blocks)."""
    from tessellm.backends.reference.moe import fused_moe_reference
    from tessellm.distributed.parallel_state import TensorParallel
    from tessellm.kernels.fused_ops import TritonOps
    from tessellm.layers import moe_bnb

    def no_dense(*args):
        raise AssertionError("the dense path ran")

    monkeypatch.setattr(moe_bnb, "dense_experts", no_dense)
    ops = TritonOps()
    q13, a13, d13 = _quantized(8, 256, 64, seed=1)  # I = 128: two ranks hold 64 rows each
    q2, a2, d2 = _quantized(8, 64, 128, seed=2)
    g = torch.Generator().manual_seed(tokens)
    x, logits = torch.randn(tokens, 64, generator=g), torch.randn(tokens, 8, generator=g)
    tol = dict(rtol=1e-4, atol=1e-5)
    whole = _layer(ops, (q13, a13), (q2, a2), intermediate=128)
    assert not whole._bnb_dense
    want = fused_moe_reference(x, logits, d13, d2, 2)
    torch.testing.assert_close(whole(x, logits), want, **tol)
    if tokens > 1:  # the parallel layouts once (the dequantized path's: tests/kernels)
        return
    ep = _layer(ops, (q13[4:], a13[4:]), (q2[4:], a2[4:]), intermediate=128,
                tp=TensorParallel(rank=1, size=2), expert_parallel=True)
    want_ep = fused_moe_reference(x, logits, d13[4:], d2[4:], 2, expert_map=ep.expert_map)
    torch.testing.assert_close(ep(x, logits), want_ep, **tol)
    total = torch.zeros_like(want)
    for r in range(2):
        rows = torch.cat([torch.arange(r * 64, r * 64 + 64), torch.arange(128 + r * 64,
                                                                          192 + r * 64)])
        rank = _layer(ops, (q13[:, rows], a13[:, rows]),
                      (q2[:, :, r * 32:r * 32 + 32], a2[:, :, r:r + 1]), intermediate=128,
                      tp=TensorParallel(rank=r, size=2))
        total += rank(x, logits)
    torch.testing.assert_close(total, want, **tol)


def test_ops_without_bnb4_keep_the_dense_path(monkeypatch):
    """A plugin's ops subclassing the reference with its own ``fused_experts`` (written before
    API 26) does not inherit ``fused_moe_bnb4``: the layer dequantizes the routed experts and
    hands them over dense, as ``TESSELLM_BNB_MOE_FUSED=0`` asks of any ops."""
    from tessellm.backends.reference.moe import fused_experts_reference, fused_moe_reference
    from tessellm.backends.reference.ops import ReferenceOps

    seen = []

    class Api25Ops(ReferenceOps):
        def fused_experts(self, hidden, topk_weights, topk_ids, w13, w2, w13_scale=None,
                          w2_scale=None, **variant):
            seen.append(w13.dtype)
            return fused_experts_reference(hidden, topk_weights, topk_ids, w13, w2, w13_scale,
                                           w2_scale, **variant)

    q13, a13, d13 = _quantized(8, 128, 64, seed=3)
    q2, a2, d2 = _quantized(8, 64, 64, seed=4)
    x, logits = torch.randn(2, 64), torch.randn(2, 8)
    want = fused_moe_reference(x, logits, d13, d2, 2)
    assert ReferenceOps.fused_moe_bnb4 and not Api25Ops.fused_moe_bnb4
    moe = _layer(Api25Ops(), (q13, a13), (q2, a2))
    torch.testing.assert_close(moe(x, logits), want, rtol=0, atol=1e-6)
    assert seen == [torch.float32]  # dense experts
    monkeypatch.setenv("TESSELLM_BNB_MOE_FUSED", "0")
    assert _layer(ReferenceOps(), (q13, a13), (q2, a2))._bnb_dense
    monkeypatch.setenv("TESSELLM_BNB_MOE_FUSED", "1")
    fused = _layer(ReferenceOps(), (q13, a13), (q2, a2))
    assert not fused._bnb_dense
    torch.testing.assert_close(fused(x, logits), want, rtol=0, atol=1e-6)


def test_experts_dequantized_in_chunks(monkeypatch):
    """Several experts a chunk (``CHUNK_ELEMENTS``), a short last chunk, or one a chunk: the
    same dense experts, in the order ``used`` names them."""
    from tessellm.layers import moe_bnb

    torch.manual_seed(0)
    dense13, dense2 = torch.randn(8, 128, 64) * 0.1, torch.randn(8, 64, 64) * 0.1
    moe = _bnb_moe(dense13, dense2)  # dense13 / dense2 now the dequantized experts
    used = torch.tensor([5, 1, 7, 0, 2, 3, 6, 4])
    for chunk in (1, 3 * 128 * 64, 1 << 25):
        monkeypatch.setattr(moe_bnb, "CHUNK_ELEMENTS", chunk)
        w13 = moe_bnb.dequantize(moe.w13, moe.w13_absmax, moe.code, used, torch.float32)
        assert torch.equal(w13, dense13[used])


def test_dummy_weights_quantize_the_experts(checkpoints):
    """load_format="dummy" on a bnb checkpoint: random experts in the layer's 4-bit type (their
    dequantized values within the uniform range)."""
    from tessellm.layers import moe_bnb

    moe = _experts(build(checkpoints("mixtral")[1], load_format="dummy"))[0]
    w = moe_bnb.dequantize(moe.w2, moe.w2_absmax, moe.code, torch.arange(4), torch.float32)
    assert w.shape == (4, 64, 64) and 0.015 < w.abs().max() <= 0.02


def test_bnb_moe_quantized_on_load(checkpoints):
    """``quantization="bitsandbytes"`` on the dense checkpoint: each expert projection NF4 with
    double quantization as bitsandbytes makes it (the codes of the bnb checkpoint of the same
    settings, its router left float as on load), and that checkpoint's tokens."""
    dense_dir, bnb_dir, _ = checkpoints("mixtral", skip=("gate",))
    on_load = _experts(build(dense_dir, quantization="bitsandbytes"))
    stored = _experts(build(bnb_dir))
    for a, b in zip(on_load, stored):
        assert torch.equal(a.w13, b.w13) and torch.equal(a.w2, b.w2)
        torch.testing.assert_close(a.w13_absmax, b.w13_absmax)
    assert (generate(dense_dir, PROMPTS, MAX_NEW, quantization="bitsandbytes")
            == generate(bnb_dir, PROMPTS, MAX_NEW))


@pytest.mark.parametrize("parallel", [dict(tensor_parallel_size=2),
                                      pytest.param(dict(tensor_parallel_size=2,
                                                        enable_expert_parallel=True),
                                                   marks=pytest.mark.slow)],
                         ids=["tp2", "ep2"])
def test_bnb_moe_two_ranks_generate_like_one_device(checkpoints, parallel):
    """Two cpu workers (gloo): each expert's intermediate rows cut in whole blocks (tensor
    parallel), or half the experts whole on each rank (expert parallel): the tokens of one
    device."""
    _, bnb_dir, _ = checkpoints("qwen2-moe", "nf4", True)
    want = generate(bnb_dir, PROMPTS, MAX_NEW)
    assert generate(bnb_dir, PROMPTS, MAX_NEW, **parallel) == want


def test_bnb_moe_refusals(checkpoints):
    """8-bit experts, a rank's rows off the blocks, a float expert among 4-bit ones: one
    sentence each naming the fix."""
    from tessellm.backends.spec import QuantSpec
    from tessellm.layers import moe_bnb
    from tessellm.layers.moe_fp8 import ExpertQuant, expert_quant
    from tessellm.distributed.parallel_state import TensorParallel

    with pytest.raises(ValueError, match="bitsandbytes 8-bit are not supported.*4-bit"):
        expert_quant(QuantSpec("bitsandbytes", {"prequantized": True, "format": "bnb8"}))
    quant = ExpertQuant("bnb4", group_size=64)
    with pytest.raises(ValueError, match=r"intermediate size \(32 at tensor_parallel_size=2\)"):
        FusedMoE(4, 64, 64, 2, ops=None, quant=quant, tp=TensorParallel(rank=0, size=2))
    moe = FusedMoE(4, 64, 64, 2, ops=None, quant=quant)
    with pytest.raises(ValueError, match="expert 1 w1 is stored unquantized.*llm_int8_skip_"):
        moe.load_expert(1, "w1", torch.randn(64, 64))
    assert moe_bnb.BLOCKSIZE == 64


@pytest.mark.slow  # ~1 min interpreted
@pytest.mark.interpreted
def test_bnb_moe_on_the_cuda_backend_kernels(checkpoints):
    """The cuda backend (Triton, interpreted on host tensors without a GPU): its fused MoE's
    bnb4 variant (the decode kernels on the packed codes at decode, the routed experts
    dequantized for the grouped GEMMs at prefill): HF's greedy tokens on the dequantized
    checkpoint."""
    from tests.conftest import hf_greedy

    _, bnb_dir, deq_dir = checkpoints("mixtral")
    want = hf_greedy(deq_dir, PROMPTS[:1], 3)
    assert generate(bnb_dir, PROMPTS[:1], 3, device="cuda", emulate=True) == want


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_bnb_moe_on_a_gpu(checkpoints):
    """On a real GPU (the lead's device run): the cuda backend in float32 serves the Mixtral
    and Qwen3-MoE bnb checkpoints with HF's greedy tokens on the dequantized checkpoint."""
    from tests.conftest import hf_greedy

    for arch, quant_type in (("mixtral", "nf4"), ("qwen3-moe", "fp4")):
        _, bnb_dir, deq_dir = checkpoints(arch, quant_type)
        assert generate(bnb_dir, PROMPTS, MAX_NEW, device="cuda") == hf_greedy(deq_dir, PROMPTS,
                                                                              MAX_NEW)
