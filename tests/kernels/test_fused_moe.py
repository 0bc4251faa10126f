"""The fused MoE implementations (Triton kernel, cpu grouped) against the reference loop."""

from __future__ import annotations

import pytest
import torch

from tessellm.backends.cpu.moe import fused_moe_grouped
from tessellm.backends.reference.moe import fused_moe_reference, route
from tessellm.kernels.moe import align_by_expert, fused_moe_triton
from tessellm.kernels.moe.align import align_by_expert_triton
from tessellm.quantization.packed import quantize_fp8

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# (tokens, hidden, intermediate, experts, top_k): zero-token experts whenever T * k < E.
SHAPES = [(1, 64, 32, 8, 1), (3, 64, 48, 16, 2), (17, 96, 64, 8, 2), (5, 64, 32, 16, 8),
          (40, 32, 96, 8, 8)]


def _case(t, h, i, e, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g)
    logits = torch.randn(t, e, generator=g)
    w13 = torch.randn(e, 2 * i, h, generator=g) / h ** 0.5
    w2 = torch.randn(e, h, i, generator=g) / i ** 0.5
    return x.to(dtype), logits, w13.to(dtype), w2.to(dtype)


def _tol(dtype):
    return dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)


def test_align_by_expert_blocks_hold_one_expert():
    ids = torch.tensor([[2, 0], [0, 1], [2, 0]])
    sorted_ids, block_expert, num_padded = align_by_expert(ids, num_experts=4, block_m=4)
    assert sorted_ids[:12].tolist() == [1, 2, 5, 6, 3, 6, 6, 6, 0, 4, 6, 6]
    assert block_expert[:3].tolist() == [0, 1, 2] and num_padded.item() == 12
    flat = ids.flatten()
    for b in range(3):
        rows = [p for p in sorted_ids[4 * b:4 * b + 4].tolist() if p < 6]
        assert all(flat[p].item() == block_expert[b].item() for p in rows)
    assert sorted(p for p in sorted_ids.tolist() if p < 6) == list(range(6))


@pytest.mark.parametrize("t,k,e,block_m", [(3, 2, 4, 4), (1, 8, 128, 16), (64, 8, 128, 16),
                                             (40, 8, 8, 32), (300, 2, 16, 64)])
def test_triton_align_has_the_reference_layout(t, k, e, block_m):
    """Same blocks, experts, padding and pad rows as the torch reference; an expert's pairs take
    its rows in atomic order (on a GPU not by pair index), so only the rows' experts and the
    set of pairs are compared."""
    g = torch.Generator().manual_seed(t + e)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(DEV)
    pairs = t * k
    ref = align_by_expert(ids, e, block_m)
    got = align_by_expert_triton(ids, e, block_m)
    assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])
    assert torch.equal(got[0] == pairs, ref[0] == pairs)  # pad rows in the same places
    rows = got[0].cpu()
    valid = rows < pairs
    assert sorted(rows[valid].tolist()) == list(range(pairs))
    row_expert = got[1].cpu().repeat_interleave(block_m)
    assert torch.equal(ids.flatten().cpu()[rows[valid].long()], row_expert[valid])


@pytest.mark.parametrize("scoring,renormalize", [("softmax", True), ("softmax", False),
                                                 ("sigmoid", True)])
def test_route(scoring, renormalize):
    logits = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    weights, ids = route(logits, 2, scoring, renormalize)
    probs = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
    assert torch.equal(ids, probs.topk(2, dim=-1).indices)
    want = probs.gather(1, ids)
    if renormalize:
        want = want / want.sum(-1, keepdim=True)
    torch.testing.assert_close(weights, want)
    with pytest.raises(ValueError, match="scoring"):
        route(logits, 2, "tanh")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_and_triton_match_reference(shape, dtype):
    t, h, i, e, k = shape
    x, logits, w13, w2 = _case(t, h, i, e, dtype, seed=sum(shape))
    ref = fused_moe_reference(x, logits, w13, w2, k, "softmax", True)
    grouped = fused_moe_grouped(x, logits, w13, w2, k, "softmax", True)
    torch.testing.assert_close(grouped, ref, **_tol(dtype))
    weights, ids = route(logits, k, "softmax", True)
    out = fused_moe_triton(x.to(DEV), weights.to(DEV), ids.to(DEV), w13.to(DEV), w2.to(DEV))
    torch.testing.assert_close(out.cpu(), ref, **_tol(dtype))


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3]])
def test_fp8_experts_match_reference(shape):
    """Per-channel fp8 experts: the kernel and the grouped path against the reference, which
    dequantizes; the reference itself stays close to the unquantized experts."""
    t, h, i, e, k = shape
    x, logits, w13, w2 = _case(t, h, i, e, torch.bfloat16, seed=5)
    q13 = [quantize_fp8(w13[j]) for j in range(e)]
    q2 = [quantize_fp8(w2[j]) for j in range(e)]
    w13_q, s13 = torch.stack([q.qweight for q in q13]), torch.stack([q.scales for q in q13])
    w2_q, s2 = torch.stack([q.qweight for q in q2]), torch.stack([q.scales for q in q2])
    ref = fused_moe_reference(x, logits, w13_q, w2_q, k, "sigmoid", True, s13, s2)
    dense = fused_moe_reference(x, logits, w13, w2, k, "sigmoid", True)
    torch.testing.assert_close(ref, dense, atol=0.15, rtol=0.15)
    grouped = fused_moe_grouped(x, logits, w13_q, w2_q, k, "sigmoid", True, s13, s2)
    torch.testing.assert_close(grouped, ref, **_tol(torch.bfloat16))
    weights, ids = route(logits, k, "sigmoid", True)
    out = fused_moe_triton(x.to(DEV), weights.to(DEV), ids.to(DEV), w13_q.to(DEV), w2_q.to(DEV),
                           s13.to(DEV), s2.to(DEV))
    torch.testing.assert_close(out.cpu(), ref, **_tol(torch.bfloat16))


@pytest.mark.parametrize("e,k,scoring,renormalize",
                         [(8, 1, "softmax", True), (8, 2, "softmax", False), (60, 3, "sigmoid", True),
                          (128, 8, "softmax", True), (16, 8, "sigmoid", False)])
def test_triton_routing_matches_reference(e, k, scoring, renormalize):
    """One launch: experts of the same scores in the same order (best first; bf16 logits tie
    often, and the reference's torch.topk orders ties arbitrarily, here lowest id first) and
    weights within float32 rounding of the reference's torch expressions."""
    from tessellm.kernels.moe.routing import route_triton

    g = torch.Generator().manual_seed(e * 10 + k)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(7, e, generator=g) * 3).to(dtype)
        want_w, want_i = route(logits, k, scoring, renormalize)
        got_w, got_i = route_triton(logits.to(DEV), k, scoring, renormalize)
        assert got_i.dtype == torch.int32 and got_w.dtype == torch.float32
        got_i = got_i.cpu().long()
        probs = logits.float().softmax(-1) if scoring == "softmax" else logits.float().sigmoid()
        assert torch.equal(probs.gather(1, got_i), probs.gather(1, want_i))  # same scores
        assert all(len(set(r)) == k for r in got_i.tolist())
        untied = (probs.gather(1, want_i)[:, :, None] == probs[:, None, :]).sum(-1) == 1
        assert torch.equal(got_i[untied], want_i[untied])
        torch.testing.assert_close(got_w.cpu(), want_w, atol=1e-6, rtol=1e-5)


def test_triton_routing_ties_and_errors():
    """Equal scores go lowest expert id first (the reference leaves tie order open, so only the
    set is compared with it); a bad scoring or top_k is one clear error."""
    from tessellm.kernels.moe.routing import route_triton

    logits = torch.tensor([[0.5, 2.0, 1.0, 2.0, 2.0, -1.0], [3.0, 3.0, 3.0, 3.0, 3.0, 3.0]])
    w, i = route_triton(logits.to(DEV), 3, "softmax", True)
    assert i.cpu().tolist() == [[1, 3, 4], [0, 1, 2]]
    torch.testing.assert_close(w.cpu(), torch.full((2, 3), 1 / 3))
    want = route(logits, 3, "softmax", True)[1]
    assert sorted(want[0].tolist()) == [1, 3, 4]  # the top-3 set is tie-free in row 0 only
    with pytest.raises(ValueError, match="scoring"):
        route_triton(logits, 2, "tanh")
    with pytest.raises(ValueError, match="top_k"):
        route_triton(logits, 7)


def test_grid_holds_only_blocks_that_can_hold_tokens():
    """The host bound (no sync): one token with top-8 of 128 experts, 16-row blocks -> 8 blocks
    (128 rows), not 121; the torch and Triton layouts have that length."""
    ids = torch.randperm(128, generator=torch.Generator().manual_seed(0))[:8].view(1, 8)
    for align in (align_by_expert, align_by_expert_triton):
        sorted_ids, block_expert, num_padded = align(ids.to(DEV), 128, 16)
        assert sorted_ids.numel() == 128 and block_expert.numel() == 8
        assert num_padded.item() == 128
    assert align_by_expert(torch.zeros(0, 8, dtype=torch.long), 128, 16)[0].numel() == 16


# (tokens, hidden, intermediate, experts, top_k, scoring, renormalize, dtype, fused SiLU)
FULL = [(1, 64, 32, 16, 1, "softmax", True, torch.bfloat16, True),
        (3, 32, 48, 16, 2, "sigmoid", True, torch.float32, True),
        (5, 64, 32, 8, 8, "softmax", False, torch.bfloat16, False),
        (9, 32, 32, 16, 8, "sigmoid", False, torch.float32, False)]


@pytest.mark.parametrize("case", FULL)
def test_fused_moe_end_to_end_matches_reference(case):
    """The contract's entry (Triton routing + alignment + GEMMs + top-k sum) against the
    reference loop, with SiLU-and-mul in GEMM 1's epilogue and as its own kernel; experts with
    zero tokens in every case with T * k < E."""
    from tessellm.kernels.moe import fused_moe

    t, h, i, e, k, scoring, renorm, dtype, fused = case
    x, logits, w13, w2 = _case(t, h, i, e, dtype, seed=t + k)
    ref = fused_moe_reference(x, logits, w13, w2, k, scoring, renorm)
    args = [v.to(DEV) for v in (x, logits, w13, w2)]
    got = fused_moe(*args, k, scoring, renorm)
    torch.testing.assert_close(got.cpu(), ref, **_tol(dtype))
    from tessellm.kernels.moe.routing import route_triton

    weights, ids = route_triton(args[1], k, scoring, renorm)
    tiles = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SILU_MUL=fused)
    got = fused_moe_triton(args[0], weights, ids, args[2], args[3], tiles=tiles)
    torch.testing.assert_close(got.cpu(), ref, **_tol(dtype))


def test_fp8_experts_unfused_silu_match_reference():
    """fp8 experts through the unfused SiLU path (the prefill tiles' path on a GPU)."""
    t, h, i, e, k = 4, 32, 32, 8, 2
    x, logits, w13, w2 = _case(t, h, i, e, torch.bfloat16, seed=9)
    q13 = [quantize_fp8(w13[j]) for j in range(e)]
    q2 = [quantize_fp8(w2[j]) for j in range(e)]
    w13_q, s13 = torch.stack([q.qweight for q in q13]), torch.stack([q.scales for q in q13])
    w2_q, s2 = torch.stack([q.qweight for q in q2]), torch.stack([q.scales for q in q2])
    ref = fused_moe_reference(x, logits, w13_q, w2_q, k, "softmax", True, s13, s2)
    weights, ids = route(logits, k, "softmax", True)
    tiles = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SILU_MUL=False)
    out = fused_moe_triton(x.to(DEV), weights.to(DEV), ids.to(DEV), w13_q.to(DEV), w2_q.to(DEV),
                           s13.to(DEV), s2.to(DEV), tiles=tiles)
    torch.testing.assert_close(out.cpu(), ref, **_tol(torch.bfloat16))


# (tokens, hidden, intermediate, experts, top_k, dtype): ragged H and I (masked K tails, rows
# past I / H clamped), one expert chosen by two tokens, top-k 1 and 8.
DECODE = [(1, 64, 32, 16, 8, torch.bfloat16), (2, 80, 30, 8, 2, torch.float32),
          (4, 32, 48, 4, 3, torch.bfloat16), (3, 48, 20, 16, 1, torch.float32)]


@pytest.mark.parametrize("case", DECODE)
def test_decode_path_matches_reference_and_grouped(case):
    """The two-launch decode path (``decode.py``) against the reference loop and against the
    grouped GEMM path on the same routing; rows of the same expert (experts < T * k) too."""
    from tessellm.kernels.moe.decode import fused_moe_decode

    t, h, i, e, k, dtype = case
    x, logits, w13, w2 = _case(t, h, i, e, dtype, seed=t * 7 + i)
    ref = fused_moe_reference(x, logits, w13, w2, k, "softmax", True)
    weights, ids = route(logits, k, "softmax", True)
    args = [v.to(DEV) for v in (x, weights, ids.to(torch.int32), w13, w2)]
    got = fused_moe_decode(*args, up_rows=2, down_rows=4)
    torch.testing.assert_close(got.cpu(), ref, **_tol(dtype))
    grouped = fused_moe_triton(*args, tiles=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32))
    torch.testing.assert_close(got, grouped, **_tol(dtype))


@pytest.mark.parametrize("case", DECODE)
@pytest.mark.parametrize("scoring,renormalize", [("softmax", True), ("sigmoid", False)])
def test_decode_path_routing_inside_matches_reference(case, scoring, renormalize):
    """Routing inside the up kernel (the contract entry's decode path) against the reference,
    and the weights and ids it keeps against the routing kernel's."""
    from tessellm.kernels.moe.decode import _launch
    from tessellm.kernels.moe.routing import route_triton

    t, h, i, e, k, dtype = case
    x, logits, w13, w2 = _case(t, h, i, e, dtype, seed=t * 5 + e)
    ref = fused_moe_reference(x, logits, w13, w2, k, scoring, renormalize)
    args = [v.to(DEV) for v in (x, logits, w13, w2)]
    weights = torch.empty(t, k, dtype=torch.float32, device=DEV)
    ids = torch.empty(t, k, dtype=torch.int32, device=DEV)
    route = dict(logits=args[1], sigmoid=scoring == "sigmoid", renormalize=renormalize)
    got = _launch(args[0], weights, ids, route, args[2], args[3], None, None, (2, 4))
    torch.testing.assert_close(got.cpu(), ref, **_tol(dtype))
    want_w, want_i = route_triton(args[1], k, scoring, renormalize)
    assert torch.equal(ids, want_i)
    torch.testing.assert_close(weights, want_w)


def test_decode_path_fp8_experts():
    """W8A16 experts through the decode path, against the reference that dequantizes."""
    from tessellm.kernels.moe.decode import fused_moe_decode

    t, h, i, e, k = 2, 64, 48, 8, 2
    x, logits, w13, w2 = _case(t, h, i, e, torch.bfloat16, seed=3)
    q13 = [quantize_fp8(w13[j]) for j in range(e)]
    q2 = [quantize_fp8(w2[j]) for j in range(e)]
    w13_q, s13 = torch.stack([q.qweight for q in q13]), torch.stack([q.scales for q in q13])
    w2_q, s2 = torch.stack([q.qweight for q in q2]), torch.stack([q.scales for q in q2])
    ref = fused_moe_reference(x, logits, w13_q, w2_q, k, "softmax", True, s13, s2)
    weights, ids = route(logits, k, "softmax", True)
    got = fused_moe_decode(*[v.to(DEV) for v in (x, weights, ids, w13_q, w2_q, s13, s2)])
    torch.testing.assert_close(got.cpu(), ref, **_tol(torch.bfloat16))


@pytest.mark.parametrize("tokens", [2, 9])  # the decode path, the grouped GEMMs
def test_expert_map_skips_other_ranks_experts(tokens):
    """Expert parallelism: with ``expert_map`` (global id -> local row, or -1), the Triton op
    (routing given and routing inside) and the cpu grouped op give the reference's partial sum
    over the held experts; the alignment gives other ranks' pairs no row."""
    from tessellm.backends.cpu.moe import grouped_experts
    from tessellm.backends.reference.moe import fused_experts_reference
    from tessellm.kernels.moe import fused_moe

    x, logits, w13, w2 = _case(tokens, 64, 32, 8, torch.float32, seed=tokens)
    held = [5, 0, 3]
    expert_map = torch.full((8,), -1, dtype=torch.int32)
    expert_map[held] = torch.arange(3, dtype=torch.int32)
    local13, local2 = w13[held], w2[held]
    weights, ids = route(logits, 2)
    want = fused_experts_reference(x, weights, ids, local13, local2, expert_map=expert_map)
    full = fused_experts_reference(x, torch.where((ids[..., None] == torch.tensor(held)).any(-1),
                                                  weights, 0.0), ids, w13, w2)
    torch.testing.assert_close(want, full, **_tol(torch.float32))  # the held experts' share
    dev = lambda *ts: [t.to(DEV) for t in ts]  # noqa: E731
    got = fused_moe_triton(*dev(x, weights, ids, local13, local2), expert_map=expert_map.to(DEV))
    torch.testing.assert_close(got.cpu(), want, **_tol(torch.float32))
    got = fused_moe(*dev(x, logits, local13, local2), 2, expert_map=expert_map.to(DEV))
    torch.testing.assert_close(got.cpu(), want, **_tol(torch.float32))
    got = grouped_experts(x, weights, ids, local13, local2, expert_map=expert_map)
    torch.testing.assert_close(got, want, **_tol(torch.float32))
    sentinel = torch.where(expert_map[ids] >= 0, expert_map[ids], 3).to(torch.int32)
    sorted_ids, _, num_padded = align_by_expert_triton(sentinel.to(DEV), 3, 16)
    rows = sorted_ids.cpu()[:num_padded.item()]
    assert sorted(rows[rows < ids.numel()].tolist()) == (
        (sentinel.flatten() < 3).nonzero().flatten().tolist())


def test_16bit_tiles_read_pairs_per_global_expert_with_expert_parallelism(monkeypatch):
    """With ``expert_map`` (2 of 8 experts on this rank) the 16-bit tile rule gets every pair
    over the global experts, as the int4 tensor-core rule does: 64 pairs are 8 an expert (the
    16-row tile), not 32 over the 2 local experts (a 32-row tile, though this rank's experts get
    about a quarter of the pairs); the result equals the reference's."""
    import importlib

    from tessellm.backends.reference.moe import fused_experts_reference

    fm = importlib.import_module("tessellm.kernels.moe.fused_moe")  # the package's name is the op
    x, logits, w13, w2 = _case(32, 64, 32, 8, torch.float32, seed=3)
    held = [2, 5]
    expert_map = torch.full((8,), -1, dtype=torch.int32)
    expert_map[held] = torch.arange(2, dtype=torch.int32)
    weights, ids = route(logits, 2)
    seen, rule = [], fm._tiles
    monkeypatch.setattr(fm, "_tiles", lambda pairs, experts, *a: seen.append((pairs, experts))
                        or rule(pairs, experts, *a))
    got = fused_moe_triton(*(t.to(DEV) for t in (x, weights, ids, w13[held], w2[held])),
                           expert_map=expert_map.to(DEV))
    assert seen == [(64, 8)]
    want = fused_experts_reference(x, weights, ids, w13[held], w2[held], expert_map=expert_map)
    torch.testing.assert_close(got.cpu(), want, **_tol(torch.float32))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the hardware rule's choice
    assert (rule(64, 8)["BLOCK_M"], rule(64, 2)["BLOCK_M"]) == (16, 32)

