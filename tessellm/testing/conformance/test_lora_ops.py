"""The backend's batched LoRA ops (``LoRAOps``: prepare, shrink, expand, expand_slices) against
a per-row oracle written here, independent of the reference: mixed slots (some rows without an
adapter, some slots unused), ranks zero-padded, a fused q/k/v projection (one shrink of stacked
A matrices; q through ``expand``, k and v in one ``expand_slices``), decode-sized and
prefill-sized batches, float32 and bfloat16. A backend without ``tessellm_lora_ops`` is checked
through the reference it gets."""

from __future__ import annotations

import pytest
import torch

from tessellm.backends.spec import LoRAOps, LoRAOpsSpec
from tessellm.testing.harness import seed_of

SLOTS, RANK, HIDDEN = 4, 16, 64
SLICES = (64, 32, 32)  # a q/k/v-like fused projection: output widths of its slices


def _ops(target, dtype):
    ops = target.registry.lora_ops(target.backend, LoRAOpsSpec(dtype, SLOTS, RANK, target.device))
    assert isinstance(ops, LoRAOps), f"{target.name}: {type(ops).__name__} is not a LoRAOps"
    return ops


def _oracle_shrink(x, lora_a, slots):
    out = torch.zeros(x.shape[0], lora_a.shape[1])
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            out[t] = lora_a[s].double() @ x[t].double()
    return out


def _oracle_expand(buf, lora_b, slots, scaling, out, offset):
    want = out.clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            delta = scaling[s].double() * (lora_b[s].double() @ buf[t].double())
            cols = slice(offset, offset + lora_b.shape[1])
            want[t, cols] = (want[t, cols].double() + delta).to(out.dtype)
    return want


def _adapters(ranks, seed):
    """Stacked q/k/v A ``[S, 3R, K]`` and per-slice B ``[S, N_i, R]``; slot s has rank ranks[s]
    (0: an empty slot), zero-padded to RANK."""
    g = torch.Generator().manual_seed(seed)
    lora_a = torch.zeros(SLOTS, len(SLICES) * RANK, HIDDEN)
    lora_b = [torch.zeros(SLOTS, n, RANK) for n in SLICES]
    for s, r in enumerate(ranks):
        for i, n in enumerate(SLICES):
            lora_a[s, i * RANK:i * RANK + r] = torch.randn(r, HIDDEN, generator=g) / HIDDEN ** 0.5
            lora_b[i][s, :, :r] = torch.randn(n, r, generator=g) / r ** 0.5
    return lora_a, lora_b


def _tol(dtype):
    return dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)


def _slots(tokens, pattern, g):
    if pattern == "mixed":
        return torch.randint(-1, SLOTS - 1, (tokens,), generator=g, dtype=torch.int32)  # slot 3 unused
    if pattern == "none":
        return torch.full((tokens,), -1, dtype=torch.int32)
    return torch.full((tokens,), 2, dtype=torch.int32)  # "one": every row the same adapter


@pytest.mark.parametrize("tokens,pattern", [(1, "mixed"), (1, "one"), (7, "mixed"), (7, "none"),
                                            (64, "mixed"), (200, "mixed"), (200, "one")])
def test_lora_shrink_expand(target, tokens, pattern):
    g = torch.Generator().manual_seed(seed_of("lora", tokens, pattern))
    lora_a, lora_b = _adapters((8, 16, 4, 0), seed=tokens)
    scaling = torch.tensor([2.0, 0.5, 1.0, 1.0])
    slots = _slots(tokens, pattern, g)
    x = torch.randn(tokens, HIDDEN, generator=g)
    dev = target.device
    for dtype in (torch.float32, target.low_precision_dtype):
        ops = _ops(target, dtype)
        xd, ad = x.to(dtype), lora_a.to(dtype)
        meta = ops.prepare(slots.to(dev), SLOTS)
        buf = torch.full((tokens, lora_a.shape[1]), float("nan"), device=dev)  # rows -1 must get 0
        ops.shrink(xd.to(dev), ad.to(dev), meta, buf)
        want_buf = _oracle_shrink(xd.float(), ad.float(), slots)
        torch.testing.assert_close(buf.cpu(), want_buf, **_tol(dtype), msg=f"shrink {dtype}")
        out = torch.randn(tokens, sum(SLICES) + 8, generator=g).to(dtype)
        got, want = out.to(dev, copy=True), out.clone()
        offsets = [8 + sum(SLICES[:i]) for i in range(len(SLICES))]
        bd = [b.to(dtype) for b in lora_b]
        # q alone through expand, k and v in one expand_slices call
        ops.expand(buf[:, :RANK], bd[0].to(dev), meta, scaling.to(dev), got, offsets[0])
        ops.expand_slices(buf[:, RANK:], [b.to(dev) for b in bd[1:]], meta, scaling.to(dev), got,
                          offsets[1:])
        for i, offset in enumerate(offsets):
            cols = slice(i * RANK, (i + 1) * RANK)
            want = _oracle_expand(want_buf[:, cols], bd[i].float(), slots, scaling, want, offset)
        assert got.dtype == dtype
        torch.testing.assert_close(got.cpu().float(), want.float(), **_tol(dtype),
                                   msg=f"expand {dtype}")
        untouched = slots < 0  # rows without an adapter, and columns outside the slices: exact
        assert torch.equal(got.cpu()[untouched], out[untouched])
        assert torch.equal(got.cpu()[:, :8], out[:, :8])


def test_lora_prepare_is_reusable_across_layers(target):
    """One prepare serves every layer of a step: two shrinks with different weights."""
    g = torch.Generator().manual_seed(seed_of("lora-layers"))
    slots = torch.tensor([1, 0, -1, 1, 2], dtype=torch.int32)
    ops = _ops(target, torch.float32)
    meta = ops.prepare(slots.to(target.device), SLOTS)
    for layer in range(2):
        lora_a, _ = _adapters((8, 16, 4, 0), seed=layer)
        x = torch.randn(5, HIDDEN, generator=g)
        buf = torch.empty(5, lora_a.shape[1], device=target.device)
        ops.shrink(x.to(target.device), lora_a.to(target.device), meta, buf)
        torch.testing.assert_close(buf.cpu(), _oracle_shrink(x, lora_a, slots), **_tol(torch.float32))


def test_lora_ops_graph_capture(target):
    """Ops that declare ``supports_graph_capture``: prepare + shrink + expand captured in a CUDA
    graph once, replayed with other slots and inputs copied into the static buffers."""
    ops = _ops(target, torch.bfloat16)
    if not getattr(ops, "supports_graph_capture", False):
        pytest.skip(f"{target.name}'s LoRA ops do not declare supports_graph_capture")
    target.skip_if_emulated("CUDA graph capture")
    if target.device.type != "cuda":
        pytest.skip("graph capture is checked through torch.cuda.CUDAGraph")
    dev, tokens = target.device, 8
    lora_a, lora_b = _adapters((8, 16, 4, 0), seed=3)
    lora_a, lora_b = lora_a.to(dev, torch.bfloat16), lora_b[0].to(dev, torch.bfloat16)
    scaling = torch.ones(SLOTS, device=dev)
    slots = torch.zeros(tokens, dtype=torch.int32, device=dev)
    x = torch.zeros(tokens, HIDDEN, dtype=torch.bfloat16, device=dev)
    buf = torch.zeros(tokens, lora_a.shape[1], device=dev)
    out = torch.zeros(tokens, SLICES[0], dtype=torch.bfloat16, device=dev)

    def step():
        meta = ops.prepare(slots, SLOTS)
        ops.shrink(x, lora_a, meta, buf)
        ops.expand(buf[:, :RANK], lora_b, meta, scaling, out, 0)

    step()  # warm-up (compiles the kernels) outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    g = torch.Generator().manual_seed(seed_of("lora-graph"))
    new_slots = torch.tensor([2, -1, 0, 1, 1, -1, 2, 0], dtype=torch.int32)
    new_x = torch.randn(tokens, HIDDEN, generator=g).to(torch.bfloat16)
    slots.copy_(new_slots)
    x.copy_(new_x)
    out.zero_()
    graph.replay()
    want_buf = _oracle_shrink(new_x.float(), lora_a.float().cpu(), new_slots)
    want = _oracle_expand(want_buf[:, :RANK], lora_b.float().cpu(), new_slots, scaling.cpu(),
                          torch.zeros(tokens, SLICES[0]), 0)
    torch.testing.assert_close(out.float().cpu(), want, **_tol(torch.bfloat16))
