"""The memory-profiling forward that sizes the KV cache on accelerators
(``core/memory_profile.py``): its step covers the scheduler's worst step under the engine's
limits, row by row and in the sampler, and the cache it is sized for leaves its blocks alone."""

from __future__ import annotations

import random

import pytest
import torch

from tessellm import LLM, SamplingParams
from tessellm.backends.cuda.graph_runner import default_capture_sizes
from tessellm.core.block_manager import BlockManager
from tessellm.core.memory_profile import (PROFILE_LOGPROBS, PROMPT_LOGPROB_MIN_ROWS, graph_memory_estimate,
                                         profile_shape)
from tessellm.core.request import Request
from tessellm.core.runner_kv_cache import kv_cache_tensors
from tessellm.core.runner_output import prompt_logprobs
from tessellm.core.scheduler import Scheduler, SchedulerConfig
from tessellm.layers.rotary import RotaryEmbedding


def test_profile_run_keeps_positions_inside_the_context(tiny_model_dir):
    """A profile batch larger than the context is split into prompts of at most
    ``max_model_len`` tokens: one longer prompt indexed the rotary table past its end (an
    illegal address on a GPU, found when freed memory followed the table)."""
    llm = LLM(tiny_model_dir("llama"), device="cpu", dtype="float32", max_model_len=128,
              max_num_batched_tokens=300)
    runner = llm.engine.core.runner
    table = next(m for m in runner.model.modules() if isinstance(m, RotaryEmbedding)).cos_sin_cache
    caches = [(a.k_cache, a.v_cache) for a in runner.model.attention_layers()]
    seen = []
    real = runner.model.forward

    def spy(input_ids, positions, *rest):
        seen.append(positions.clone())
        return real(input_ids, positions, *rest)

    runner.model.forward = spy
    runner.profile_run(table.shape[0] + 300)  # more tokens than the rotary table has rows
    del runner.model.forward
    positions = seen[0]
    assert positions.numel() == table.shape[0] + 300
    assert int(positions.max()) <= 127  # every prompt fits the context
    for a, (k, v) in zip(runner.model.attention_layers(), caches):  # profile_run frees them
        a.k_cache, a.v_cache = k, v
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}],
                       SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize("budget,seqs,max_len", [(64, 8, 40), (48, 16, 256), (40, 4, 16)])
def test_profile_shape_covers_every_step_the_scheduler_sends(budget, seqs, max_len):
    """A real scheduler under the same limits, fed mixed prompt lengths with arrivals between
    steps (chunked prefills beside decodes): no step has more tokens, rows or sampled rows than
    the profile step, and none holds a prompt row longer than the context."""
    shape = profile_shape(budget, seqs, max_len)
    assert shape.num_tokens == min(budget, seqs * max_len)
    assert len(shape.counts) == min(seqs, budget)
    assert shape.num_decodes >= 1 and max(shape.counts) <= max_len
    assert list(shape.counts) == sorted(shape.counts)  # decodes first, as the runner orders them
    rng = random.Random(budget + seqs)
    sched = Scheduler(SchedulerConfig(seqs, budget, max_len), BlockManager(4096, 4, True))
    lens = [rng.choice([rng.randrange(1, 5), rng.randrange(1, max_len - 8)]) for _ in range(100)]
    pending = [Request(f"r{i}", [rng.randrange(1, 500) for _ in range(n)],
                       SamplingParams(max_tokens=rng.randrange(1, 24), ignore_eos=True), eos_token_ids=[0])
               for i, n in enumerate(lens)]
    most = {"tokens": 0, "rows": 0, "sampled": 0, "decodes": 0}
    while pending or sched.has_unfinished():
        for _ in range(rng.randrange(0, 6)):
            if pending:
                sched.add_request(pending.pop())
        out = sched.schedule()
        sampled = {}
        for rid, n in out.num_scheduled_tokens.items():
            r = sched.requests[rid]
            if r.num_computed_tokens + n >= r.num_tokens:
                sampled[rid] = [7]
        counts = list(out.num_scheduled_tokens.values())
        most = {"tokens": max(most["tokens"], sum(counts)), "rows": max(most["rows"], len(counts)),
                "sampled": max(most["sampled"], len(sampled)),
                "decodes": max(most["decodes"], sum(1 for n in counts if n == 1))}
        assert max(counts, default=0) <= max_len
        sched.update(out, sampled)
    assert most["tokens"] <= shape.num_tokens and most["rows"] <= len(shape.counts)
    assert most["sampled"] <= shape.sampled_rows
    assert most["rows"] == seqs  # the workload reached the row limit, so the bound was tested
    with_spec = profile_shape(budget, seqs, max_len, spec_tokens=3)
    assert with_spec.sampled_rows == min(budget, 4 * len(with_spec.counts))  # k + 1 rows a request


def test_profile_step_runs_every_row_and_the_widest_sampler(tiny_model_dir):
    """The profile step's attention batch has ``max_num_seqs`` rows, decodes among them (the
    split-KV decode path and its workspace), and its sampler sees one row per row with every
    feature that allocates ``[rows, vocab]``; the engine's sampler draws stay its seed's."""
    llm = LLM(tiny_model_dir("llama"), device="cpu", dtype="float32", max_model_len=64,
              max_num_seqs=12, max_num_batched_tokens=100)
    runner = llm.engine.core.runner
    batches, sampled = [], []
    build, call = runner.kernel.build_metadata, type(runner.sampler).__call__

    def spy_build(batch):
        batches.append(batch)
        return build(batch)

    def spy_call(sampler, logits, batch):
        sampled.append((logits.shape, batch))
        return call(sampler, logits, batch)

    runner.kernel.build_metadata = spy_build
    type(runner.sampler).__call__ = spy_call
    generator = runner.sampler.generator.get_state()
    try:
        runner.profile_run(100)
    finally:
        del runner.kernel.build_metadata
        type(runner.sampler).__call__ = call
    shape = profile_shape(100, 12, 64)
    (batch,) = batches
    assert (batch.num_tokens, batch.num_seqs, batch.num_decodes) == (100, 12, shape.num_decodes)
    assert batch.num_decodes > 0 and batch.max_query_len <= 64
    ((rows, vocab), sb), = sampled
    assert rows == shape.sampled_rows == 12 and vocab == runner.vocab_size
    assert not sb.all_greedy and sb.top_p is not None and sb.top_k is None and sb.min_p is not None
    assert sb.repetition is not None and sb.output_counts.shape == (12, vocab)
    assert sb.allowed_rows == list(range(12)) and sb.logit_bias and sb.banned
    assert sb.max_num_logprobs == PROFILE_LOGPROBS
    assert torch.equal(runner.sampler.generator.get_state(), generator)
    assert runner.logits_row_bytes == vocab * 4 and runner.profile_tokens == 100
    # the decode graphs share one logits buffer (the largest's rows), each keeps its own
    # otherwise: the reserve covers both, the largest graph's transient logits twice
    hidden = torch.zeros(max(default_capture_sizes(12)), runner.model.config.hidden_size)
    largest = runner.model.compute_logits(hidden).nbytes
    kept = sum(runner.model.compute_logits(hidden[:n]).nbytes for n in default_capture_sizes(12))
    assert graph_memory_estimate(default_capture_sizes(12), runner.logits_row_bytes, 0.0) >= 3 * largest
    assert graph_memory_estimate(default_capture_sizes(12), runner.logits_row_bytes, 0.0,
                                 shared_logits=False) >= kept + 2 * largest
    for a in runner.model.attention_layers():  # profile_run frees its cache
        assert a.k_cache.shape[0] == 0
    llm.shutdown()


def test_kv_cache_in_one_allocation_is_disjoint_aligned_and_zeroed():
    """The CUDA layout (``kv_cache_tensors``): every tensor a view of one allocation, at a
    multiple of 256 bytes, contiguous, zeroed, and writing one leaves the others as they were."""
    shapes = [(5, 4, 3, 8), (5, 4, 3, 8), (5, 4, 1, 24), (5, 4, 3, 8)]
    ts = kv_cache_tensors(shapes, torch.bfloat16, torch.device("cpu"), one_allocation=True)
    assert [tuple(t.shape) for t in ts] == shapes
    base = ts[0].untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == base for t in ts)
    spans = sorted((t.data_ptr(), t.data_ptr() + t.nbytes) for t in ts)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert all((t.data_ptr() - base) % 256 == 0 and t.is_contiguous() and not t.any() for t in ts)
    ts[1].fill_(1)
    assert not ts[0].any() and not ts[2].any() and bool((ts[1] == 1).all())
    per_tensor = kv_cache_tensors(shapes, torch.bfloat16, torch.device("cpu"), one_allocation=False)
    assert len({t.untyped_storage().data_ptr() for t in per_tensor}) == len(shapes)


class _StateLayer:
    """A recurrent layer's state shapes, as a Mamba mixer's ``state_shapes`` / ``bind``."""

    def __init__(self, conv, ssm):
        self.shapes = conv, ssm

    def state_shapes(self):
        return self.shapes

    def bind(self, conv_state, ssm_state, step):
        self.conv_state, self.ssm_state = conv_state, ssm_state


def test_state_snapshot_pools_in_one_allocation_as_the_kv_cache():
    """A hybrid model's prefix-cache snapshot pools are allocated after the memory profile, as
    the KV cache is, so on CUDA they take its layout too (per-layer pools would take blocks the
    profile left cached): every pool a view of one allocation, shaped ``[num, *state]``,
    zeroed, each its own; elsewhere a buffer per pool."""
    from tessellm.core.mamba_state import MambaStateCache

    layers = [_StateLayer((6, 3), (2, 4, 5)), _StateLayer((10, 3), (2, 4, 5)), _StateLayer((6, 3), (1, 8))]
    cache = MambaStateCache(layers, 3, torch.device("cpu"), torch.bfloat16)
    cache.allocate_snapshots(7, one_allocation=True)
    pools = [p for pair in cache.snapshots for p in pair]
    assert [tuple(p.shape) for p in pools] == [(7, *s) for layer in layers for s in layer.shapes]
    assert all(p.dtype == torch.bfloat16 and p.is_contiguous() and not p.any() for p in pools)
    assert len({p.untyped_storage().data_ptr() for p in pools}) == 1
    spans = sorted((p.data_ptr(), p.data_ptr() + p.nbytes) for p in pools)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    pools[3].fill_(1)
    assert sum(int(p.count_nonzero()) for p in pools) == pools[3].numel()
    cache.allocate_snapshots(7)  # the host: a buffer per pool
    assert len({p.untyped_storage().data_ptr() for pair in cache.snapshots for p in pair}) == 6


def test_prompt_logprobs_in_chunks_match_the_whole(tiny_model_dir):
    """Prompt logprobs take at most ``chunk`` rows of logits at a time, with the same values."""
    llm = LLM(tiny_model_dir("llama"), device="cpu", dtype="float32", max_model_len=64)
    model = llm.engine.core.runner.model
    hidden = torch.randn(20, model.config.hidden_size)
    seen = []
    real = model.compute_logits

    def spy(h):
        seen.append(h.shape[0])
        return real(h)

    class State:
        def __init__(self):
            self.token_ids = list(range(3, 40))
            self.params = SamplingParams(prompt_logprobs=2)
            self.prompt_logprobs = []

    whole, chunked = State(), State()
    prompt_logprobs(model, hidden, [(whole, 2, 4, 15)], chunk=1000)
    model.compute_logits = spy
    prompt_logprobs(model, hidden, [(chunked, 2, 4, 15)], chunk=4)
    del model.compute_logits
    assert seen == [4, 4, 4, 3]
    ids_ranks = [[(t, r) for t, _, r, _ in s.prompt_logprobs] for s in (chunked, whole)]
    assert ids_ranks[0] == ids_ranks[1] and len(ids_ranks[0]) == 15
    for (_, a, _, ta), (_, b, _, tb) in zip(chunked.prompt_logprobs, whole.prompt_logprobs):
        assert a == pytest.approx(b, abs=1e-5) and [i for i, _ in ta] == [i for i, _ in tb]
    llm.shutdown()


def test_prompt_logprob_chunk_has_a_floor_the_profile_step_covers(tiny_model_dir):
    """With ``max_num_seqs=1`` a long prompt's logprobs still take ``PROMPT_LOGPROB_MIN_ROWS``
    rows of logits at a time (not one logits call per prompt token), and the profile step runs
    exactly such a chunk, its top logprobs included, beside its hidden states."""
    llm = LLM(tiny_model_dir("llama"), device="cpu", dtype="float32", max_model_len=128,
              max_num_seqs=1, max_num_batched_tokens=128)
    runner = llm.engine.core.runner
    model = runner.model
    seen, topk = [], []
    real, real_topk = model.compute_logits, torch.Tensor.topk

    def spy(h):
        seen.append(h.shape[0])
        return real(h)

    def spy_topk(t, k, *args, **kwargs):
        topk.append((tuple(t.shape), k))
        return real_topk(t, k, *args, **kwargs)

    model.compute_logits = spy
    try:
        out = llm.generate([{"prompt_token_ids": list(range(3, 103))}],
                           SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1), use_tqdm=False)
        assert len(out[0].prompt_logprobs) == 100  # the first token's entry is None
        assert seen == [PROMPT_LOGPROB_MIN_ROWS, 99 - PROMPT_LOGPROB_MIN_ROWS, 1]
        seen.clear()
        torch.Tensor.topk = spy_topk
        runner.profile_run(128)
    finally:
        del model.compute_logits
        torch.Tensor.topk = real_topk
    assert profile_shape(128, 1, 128).prompt_logprob_rows == PROMPT_LOGPROB_MIN_ROWS
    assert seen == [PROMPT_LOGPROB_MIN_ROWS, 1]  # the chunk, then the sampled row
    assert ((PROMPT_LOGPROB_MIN_ROWS, runner.vocab_size), PROFILE_LOGPROBS) in topk
    assert profile_shape(40, 1, 128).prompt_logprob_rows == 40  # no step holds more
    assert profile_shape(512, 100, 128).prompt_logprob_rows == 100  # max_num_seqs above the floor
    llm.shutdown()


def test_graph_reserve_covers_the_verify_graphs_outputs(tiny_model_dir):
    """With speculative decoding the verify graphs (a runner per q = 2..k+1, its largest
    graph's activations and ``[S * q, vocab]`` logits transient in its pool) are reserved too,
    and the capture warm-up once for all runners (the largest: each capture empties the
    allocator's cache, so no two warm-ups are held at once), not once per verify runner; the
    logits they keep are rows of the decode graphs' buffer (tests/core/test_graph_logits.py)."""
    from tessellm.spec_decode.verify_graphs import capture_sizes
    from tests.spec_decode.test_verify_graphs import StandInGraphRunner

    llm = LLM(tiny_model_dir("llama"), device="cpu", dtype="float32", max_model_len=64,
              max_num_seqs=8, speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    runner = llm.engine.core.runner
    runner.profile_run(64)
    runner.graph_runner = StandInGraphRunner(default_capture_sizes(8))
    runner.kernel.supports_graph_capture = True
    runner.verify_graph_factory = None
    plain = runner.graph_memory_estimate()
    runner.verify_graph_factory = StandInGraphRunner
    with_verify = runner.graph_memory_estimate()
    sizes = capture_sizes(8, runner.spec.config.disable_by_batch_size)
    row, per_token = runner.logits_row_bytes, runner.profile_peak_bytes / runner.profile_tokens
    pool = lambda rows: int(per_token * rows) + rows * row  # noqa: E731 - a runner's transient
    rounded = lambda n: -(-n // (2 << 20)) * (2 << 20)  # noqa: E731
    decode, verify = max(default_capture_sizes(8)), [max(sizes) * q for q in (2, 3, 4)]
    assert plain >= 3 * decode * row > 0
    warm_up = max(pool(decode), *map(pool, verify)) - pool(decode)  # the largest, once
    kept = rounded(max(decode, *verify) * row) - rounded(decode * row)  # the shared buffer
    assert with_verify - plain == sum(map(pool, verify)) + warm_up + kept + 3 * len(sizes) * (2 << 20)
    llm.shutdown()


def test_worker_counts_the_verify_graphs_pools_beside_the_decode_graphs(tiny_model_dir):
    """After capture the worker's memory profile (the reserve against what the graphs took)
    counts every graph runner's pool: the decode graphs' and each verify runner's (q = 2..k+1),
    as ``graph_memory_estimate`` reserves them."""
    from tests.spec_decode.test_verify_graphs import StandInGraphRunner

    class Pooled(StandInGraphRunner):  # a device runner's pool: 1 MiB a captured size
        def capture(self, step, make_inputs):
            super().capture(step, make_inputs)
            self.pool_bytes = len(self.capture_sizes) << 20

    llm = LLM(tiny_model_dir("llama"), device="cpu", dtype="float32", max_model_len=64,
              max_num_seqs=4, num_kv_blocks=32,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    worker = llm.engine.core.executor.worker
    runner = worker.runner
    runner.graph_runner = Pooled((1, 2, 4))
    runner.kernel.supports_graph_capture = True
    runner.verify_graph_factory = Pooled
    worker.memory_profile = {"graph_estimate": 0}  # (the cpu runs no profile)
    with torch.inference_mode():
        worker.initialize_cache(32)
    verify = list(runner.verify_graphs.runners.values())
    assert len(verify) == 3
    want = sum(len(r.capture_sizes) for r in verify) << 20
    assert worker.memory_profile["graph_pools"] == {"decode": 3 << 20, "verify": want, "draft": 0}
    assert worker.memory_profile["graph_pool"] == (3 << 20) + want
    llm.shutdown()


def test_graph_runner_keeps_only_wholly_free_default_pool_segments_of_its_stream(monkeypatch):
    """What the cuda graph runner caches again after capture (torch.cuda.graph empties the
    cache): wholly free large segments of the current device and stream in the default pool,
    read from the allocator's snapshot; its pool's bytes from the same snapshot."""
    from types import SimpleNamespace

    from tessellm.backends.cuda import graph_runner as gr

    def seg(size, used=0, stream=7, device=0, kind="large", pool=(0, 0)):
        return {"total_size": size, "allocated_size": used, "stream": stream, "device": device,
                "segment_type": kind, "segment_pool_id": pool}

    snapshot = [seg(896 << 20), seg(448 << 20), seg(900 << 20, used=800 << 20),  # KV in it: kept out
                seg(2 << 20, kind="small"), seg(64 << 20, stream=9), seg(32 << 20, device=1),
                seg(62 << 20, pool=(1, 5)), seg(20 << 20, pool=(1, 5), used=4 << 20)]
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda: snapshot)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: SimpleNamespace(cuda_stream=7))
    assert sorted(gr.cached_segments()) == [448 << 20, 896 << 20]
    assert gr.pool_bytes((1, 5)) == 82 << 20 and gr.pool_bytes(None) == 0
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda: [{"total_size": 1}])
    assert gr.cached_segments() == []  # an unreadable snapshot: nothing, and a warning


def test_no_room_for_a_kv_block_names_the_budget_to_raise(tiny_model_dir, monkeypatch):
    """A KV budget smaller than one block is one error naming the knob that sets it (on the
    cpu, TESSELLM_CPU_KV_CACHE_GB; not gpu_memory_utilization, which the cpu does not read)."""
    monkeypatch.setenv("TESSELLM_CPU_KV_CACHE_GB", "0.0000001")  # ~100 bytes
    with pytest.raises(RuntimeError, match="No memory is left for the KV cache.*raise "
                                           "TESSELLM_CPU_KV_CACHE_GB"):
        LLM(tiny_model_dir("llama"), device="cpu", dtype="float32", max_model_len=64)


@pytest.mark.parametrize("vocab", [8, 384])
def test_profile_sampler_params_run_on_a_small_vocabulary(vocab):
    """The profile's widest sampler path runs on any vocabulary (its top logprobs at most the
    vocabulary, as requests are held to: ``input_processor._check_vocab``), through the real
    sampler."""
    from tessellm.core.input_batch import RunnerRequest
    from tessellm.core.memory_profile import profile_sampling_params
    from tessellm.core.sampler import Sampler
    from tessellm.core.sampling_metadata import build_sampling_batch

    params = profile_sampling_params(vocab)
    assert params.logprobs == min(PROFILE_LOGPROBS, vocab)
    rows = [RunnerRequest(f"r{i}", [0, 1], 1, params, [], 1) for i in range(3)]
    sampler = Sampler(torch.device("cpu"))
    batch = build_sampling_batch(rows, lambda i: 0, sampler.device, vocab, (1,))
    sampler(torch.randn(3, vocab), batch)


def test_graph_runner_keeps_the_decode_overlap_side_streams_segments_too(monkeypatch):
    """With the decode overlap on, an eager split step's side-stream blocks are that stream's:
    graph capture empties them with the current stream's, so the graph runner caches both
    again (``kept_segments``: each stream's wholly free large segments, read as for the current
    one), and a side stream of another device is left alone."""
    from types import SimpleNamespace

    from tessellm.backends.cuda import graph_runner as gr
    from tessellm.backends.cuda import streams

    def seg(size, stream, used=0):
        return {"total_size": size, "allocated_size": used, "stream": stream, "device": 0,
                "segment_type": "large", "segment_pool_id": (0, 0)}

    snapshot = [seg(896 << 20, 7), seg(64 << 20, 9), seg(40 << 20, 9), seg(30 << 20, 9, used=1),
                seg(20 << 20, 11)]
    side = SimpleNamespace(cuda_stream=9, device_index=0)
    other = SimpleNamespace(cuda_stream=11, device_index=1)
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda: snapshot)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: SimpleNamespace(cuda_stream=7))
    monkeypatch.setattr(streams, "side_streams", lambda: [side, other])
    assert gr.kept_segments() == [(None, [896 << 20]), (side, [64 << 20, 40 << 20])]
    assert gr.cached_segments(side) == [64 << 20, 40 << 20]
