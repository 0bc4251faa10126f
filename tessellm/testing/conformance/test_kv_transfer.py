"""The host KV tier's block copies (``FusedOps.swap_blocks``, plugin API 11) against the
reference, and generation with the tier on (``kv_offloading_size``) equal to generation
without it on the backend."""

from __future__ import annotations

import pytest
import torch

from tessellm.backends.reference.kv_transfer import swap_blocks as reference_swap_blocks
from tessellm.backends.spec import OpsSpec
from tessellm.testing.harness import greedy_tokens


def _swap(target):
    ops = target.registry.fused_ops(target.backend, OpsSpec(torch.float32))
    return getattr(ops, "swap_blocks", None) or reference_swap_blocks


def _host(shape, dtype, device) -> torch.Tensor:
    if device.type not in ("cpu", "xla"):
        try:
            return torch.zeros(shape, dtype=dtype, pin_memory=True)
        except RuntimeError:
            pass
    return torch.zeros(shape, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_swap_blocks_round_trip(target, dtype):
    """Device -> host -> device through the backend's op: runs of consecutive ids, a lone
    block, a host block written twice (the later copy wins), block-major [N, bs, KVH, D]."""
    target.skip_if_emulated("device memory copies")
    swap, dev = _swap(target), target.device
    g = torch.Generator().manual_seed(7)
    cache = torch.randn(12, 4, 2, 16, generator=g).to(dtype).to(dev)
    host = _host((6, 4, 2, 16), dtype, dev)
    stores = [(3, 0), (4, 1), (5, 2), (9, 4), (7, 5), (8, 5)]
    swap(cache, host, stores)
    back = torch.zeros_like(cache)
    loads = [(0, 10), (1, 11), (2, 0), (4, 6), (5, 3)]
    swap(host, back, loads)
    target.backend.synchronize()
    want_host = _oracle(cache.cpu(), 6, stores)
    want = _oracle(want_host, 12, loads)
    assert torch.equal(host.cpu().view(torch.uint8), want_host.view(torch.uint8))
    assert torch.equal(back.cpu().view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(want[10].view(torch.uint8), cache[3].cpu().view(torch.uint8))
    assert torch.equal(want[3].view(torch.uint8), cache[8].cpu().view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_swap_blocks_scattered(target, dtype):
    """Many scattered blocks each way (the batched paths: a gather or scatter on the device,
    runs of host slots), against pair-by-pair copies."""
    target.skip_if_emulated("device memory copies")
    swap, dev = _swap(target), target.device
    g = torch.Generator().manual_seed(11)
    cache = torch.randn(64, 4, 2, 16, generator=g).to(dtype).to(dev)
    host = _host((40, 4, 2, 16), dtype, dev)
    device_ids = torch.randperm(64, generator=g)[:30].tolist()
    slots = torch.randperm(40, generator=g)[:30].tolist()
    stores = list(zip(device_ids, slots))
    swap(cache, host, stores)
    back = torch.zeros_like(cache)
    loads = list(zip(slots[::2], device_ids[1::2]))  # other device blocks than they came from
    swap(host, back, loads)
    target.backend.synchronize()
    want_host = _oracle(cache.cpu(), 40, stores)
    assert torch.equal(host.cpu().view(torch.uint8), want_host.view(torch.uint8))
    want = _oracle(want_host, 64, loads)
    assert torch.equal(back.cpu().view(torch.uint8), want.view(torch.uint8))


def test_host_tier_steps_in_order(target):
    """The host tier's steps (``HostKVBuffer.apply``) through the backend's op, on its side
    streams where the device has them: random steps of stores and loads between three cache
    tensors and a pinned host buffer in several chunks, with the hazards that split a step into
    phases (a block loaded then stored again, a slot read then rewritten, one written twice),
    each applied after device work on the current stream that wrote the cache; the caches and
    the buffer equal copying pair by pair, in order, after every step."""
    target.skip_if_emulated("device memory copies")
    import random

    from tessellm.core.host_kv_buffer import HostKVBuffer
    from tessellm.core.kv_offload import LOAD, STORE

    swap, dev = _swap(target), target.device
    g = torch.Generator().manual_seed(13)
    shapes = [(24, 4, 2, 16), (24, 4, 2, 16), (24, 4, 1, 24)]
    caches = [torch.zeros(s, dtype=torch.bfloat16, device=dev) for s in shapes]
    pin = dev.type not in ("cpu", "xla")  # pinned: power-of-two chunks, here several
    buf = HostKVBuffer(caches, 10, pin, lambda n: torch.zeros(n, dtype=torch.uint8))
    assert len(buf.chunks) > 1 or not buf.pinned
    for chunk in buf.chunks:
        for t in chunk.tensors:
            t.zero_()
    want_host = [torch.zeros((10, *s[1:]), dtype=torch.bfloat16) for s in shapes]
    rng = random.Random(0)
    for step in range(9):
        fresh = [torch.randn(s, generator=g).to(torch.bfloat16) for s in shapes]
        staged = [f.to(dev) for f in fresh]
        _busy(dev)  # the step's forward, queued: long device work, then the cache written
        for cache, new in zip(caches, staged):
            cache.copy_(new, non_blocking=True)
        want_dev = [f.clone() for f in fresh]
        transfers = []
        if step % 3 == 0:  # a reload: each load's block evicted (stored) first, one phase
            blocks, slots = rng.sample(range(24), 5), rng.sample(range(10), 10)
            for b, store_slot, load_slot in zip(blocks, slots[:5], slots[5:]):
                transfers += [(STORE, b, store_slot), (LOAD, load_slot, b)]
        for _ in range(rng.randrange(2, 30) if step % 3 else 0):
            if step % 3 == 1:  # few blocks and slots: hazards, several phases
                block, slot = rng.randrange(6), rng.randrange(4)
            else:
                block, slot = rng.randrange(24), rng.randrange(10)
            transfers.append((STORE, block, slot) if rng.random() < 0.5 else (LOAD, slot, block))
        buf.apply(transfers, caches, swap)
        for kind, a, b in transfers:
            for t in range(len(shapes)):
                if kind == STORE:
                    want_host[t][b] = want_dev[t][a]
                else:
                    want_dev[t][b] = want_host[t][a]
        for cache, want in zip(caches, want_dev):  # read on the current stream
            assert torch.equal(cache.cpu(), want), f"step {step}: {transfers}"
        target.backend.synchronize()
        for t in range(len(shapes)):
            host = torch.cat([c.tensors[t] for c in buf.chunks])
            assert torch.equal(host, want_host[t]), f"step {step}, host tensor {t}: {transfers}"


def _busy(device) -> None:
    """Some milliseconds of work queued on the device's current stream (none on the cpu)."""
    if device.type in ("cpu", "xla"):
        return
    x = torch.full((1024, 1024), 1e-3, device=device)
    for _ in range(20):
        x = x @ x


def _oracle(src: torch.Tensor, num_blocks: int, mapping) -> torch.Tensor:
    """Pair by pair, in order, into zeros (host tensors)."""
    out = torch.zeros((num_blocks, *src.shape[1:]), dtype=src.dtype)
    for s, d in mapping:
        out[d] = src[s]
    return out


# The engines below run one request at a time: two sequences' room captures the graphs they
# replay (batch 1, and 2) and not the default's ladder up to 256 (the toy backend traces each
# size with torch.compile, seconds apiece; eight engines here)
FEW_GRAPHS = dict(max_num_seqs=2)


def test_generation_with_host_tier_equals_without(target, tiny_llama_dir):
    """A prompt evicted from a 12-block device cache by two others comes back from the host
    tier (no recompute) and generates the same greedy tokens."""
    target.skip_if_emulated("allocating the KV cache")
    from tessellm import LLM

    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (40,), generator=g).tolist() for _ in range(3)]
    order = [prompts[0], prompts[1], prompts[2], prompts[0]]
    outs = {}
    for size in (None, 0.01):
        with LLM(tiny_llama_dir, device=target.name, dtype="float32", block_size=4,
                 num_kv_blocks=12, max_model_len=128, kv_offloading_size=size,
                 **FEW_GRAPHS) as llm:
            outs[size] = [greedy_tokens(llm, [p], 4)[0] for p in order]
            host = llm.engine.core.kv.host
            if size is not None:
                assert host.stats.hits == 36 and host.stats.blocks_loaded == 9
    assert outs[None] == outs[0.01]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_swap_blocks_through_pageable_host_memory(target, dtype):
    """A KV connector's copies (``--kv-transfer-config``): scattered blocks into and out of a
    pageable (not pinned) host buffer, read on the host after ``backend.synchronize()``."""
    target.skip_if_emulated("device memory copies")
    swap, dev = _swap(target), target.device
    g = torch.Generator().manual_seed(5)
    cache = torch.randn(32, 4, 2, 16, generator=g).to(dtype).to(dev)
    host = torch.zeros((5, 4, 2, 16), dtype=dtype)
    stores = [(30, 0), (2, 1), (17, 2), (3, 3), (9, 4)]
    swap(cache, host, stores)
    target.backend.synchronize()
    want_host = _oracle(cache.cpu(), 5, stores)
    assert torch.equal(host.view(torch.uint8), want_host.view(torch.uint8))
    back = torch.zeros_like(cache)
    loads = [(4, 1), (0, 20), (3, 5), (1, 6), (2, 7)]
    swap(host, back, loads)
    target.backend.synchronize()
    assert torch.equal(back.cpu().view(torch.uint8), _oracle(want_host, 32, loads).view(torch.uint8))


@pytest.mark.parametrize("load_async", [True, False], ids=["background", "in-step"])
def test_generation_through_a_kv_connector_equals_without(target, tiny_llama_dir, tmp_path, load_async):
    """Disaggregated prefill on the backend: a producer engine saves a prompt's blocks to
    files (copied out on the connector's own stream where the device has streams), a consumer
    engine loads 36 of its 40 tokens (in the background on its own stream, or in the step that
    admits it) and generates the same greedy tokens."""
    target.skip_if_emulated("allocating the KV cache")
    from tessellm import LLM

    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, 256, (40,), generator=g).tolist()
    outs = {}
    for role in (None, "kv_producer", "kv_consumer"):
        kv = None if role is None else {
            "kv_connector": "SharedStorageConnector", "kv_role": role,
            "kv_connector_extra_config": {"shared_storage_path": str(tmp_path),
                                          "load_async": load_async}}
        with LLM(tiny_llama_dir, device=target.name, dtype="float32", block_size=4,
                 num_kv_blocks=32, max_model_len=128, kv_transfer_config=kv, **FEW_GRAPHS) as llm:
            outs[role] = greedy_tokens(llm, [prompt], 4)[0]
            if role == "kv_consumer":  # loaded, not recomputed after a failed load
                stats = llm.engine.core.scheduler.stats().kv_connector
                assert (stats["hits"], stats["blocks_loaded"], stats["load_failures"]) == (36, 9, 0)
    assert outs[None] == outs["kv_producer"] == outs["kv_consumer"]
