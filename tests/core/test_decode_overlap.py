"""The decode micro-batch overlap (``TESSELLM_DECODE_OVERLAP``, core/decode_overlap.py) on the
host: the split schedule runs on one stream there, and its greedy tokens equal HF's in float32
(as the unsplit path's do), with prefix-cache hits and with chunked prefill (mixed steps run
unsplit; the pure-decode steps around them split)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random

import pytest
import torch

from tessellm import LLM, SamplingParams
from tessellm.backends.reference.streams import SequentialStreams
from tessellm.core.attention_batch import AttentionBatch
from tessellm.config import EngineArgs
from tessellm.core.decode_overlap import DecodeOverlap, OverlapSettings, sequences, settings
from tests.conftest import hf_greedy

MAX_NEW = 10


def _prompts(vocab: int = 384) -> list[list[int]]:
    rng = random.Random(11)
    shared = [rng.randrange(vocab) for _ in range(40)]  # a 40-token prefix two prompts share
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (3, 17, 33, 64, 9, 48, 21)]
    prompts[3] = shared + prompts[3][:20]
    prompts[5] = shared + prompts[5][:8]
    return prompts


class CountingStreams(SequentialStreams):
    """The one-stream ``OverlapStreams`` that also logs the order of its calls."""

    def __init__(self):
        self.log: list[str] = []

    def side(self, after):
        self.log.append("side")
        return super().side(after)

    def wait(self, event):
        self.log.append("wait")


@pytest.fixture(scope="module")
def want(tiny_model_dir):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = hf_greedy(tiny_model_dir(arch), _prompts(), MAX_NEW)
        return cache[arch]

    return get


def _generate(llm: LLM) -> list[list[int]]:
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in _prompts()], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _overlap_on(monkeypatch, min_rows: int = 2, steps: str = "all") -> None:
    monkeypatch.setenv("TESSELLM_DECODE_OVERLAP", "1")
    monkeypatch.setenv("TESSELLM_DECODE_OVERLAP_MIN_ROWS", str(min_rows))
    monkeypatch.setenv("TESSELLM_DECODE_OVERLAP_STEPS", steps)
    monkeypatch.setenv("TESSELLM_DECODE_OVERLAP_MIN_PREFILL", "1")


def _count_splits(runner) -> list[int]:
    """Wraps the runner's real ``split`` to count the steps it split (their row counts)."""
    split, seen = runner.overlap.split, []

    def counted(batch, model):
        out = split(batch, model)
        if out is not None:
            seen.append(batch.num_seqs)
        return out

    runner.overlap.split = counted
    return seen


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_split_decode_matches_hf(tiny_model_dir, want, monkeypatch, arch):
    """Split steps (every pure-decode step of >= 2 rows) give HF's greedy tokens; a second
    pass of the same prompts starts from prefix-cache hits and splits again."""
    _overlap_on(monkeypatch)
    llm = LLM(tiny_model_dir(arch), dtype="float32")
    runner = llm.engine.core.runner
    assert runner.overlap is not None
    seen = _count_splits(runner)
    assert _generate(llm) == want(arch)
    assert len(seen) >= MAX_NEW - 1 and max(seen) == len(_prompts())
    first = len(seen)
    assert _generate(llm) == want(arch)
    assert llm.engine.core.kv.stats.hits > 0 and len(seen) > first


def test_split_with_chunked_prefill(tiny_model_dir, want, monkeypatch):
    """A 16-token budget: prompts prefill in chunks beside running decodes (mixed steps, run
    unsplit), pure-decode steps split; tokens still HF's."""
    _overlap_on(monkeypatch)
    llm = LLM(tiny_model_dir("llama"), dtype="float32", max_num_batched_tokens=16)
    seen = _count_splits(llm.engine.core.runner)
    assert _generate(llm) == want("llama")
    assert seen, "some pure-decode steps should have been split"


def test_min_rows_and_off(tiny_model_dir, monkeypatch):
    """Below the minimum a step runs unsplit; with the variable unset there is no overlap."""
    _overlap_on(monkeypatch, min_rows=64)
    llm = LLM(tiny_model_dir("llama"), dtype="float32")
    seen = _count_splits(llm.engine.core.runner)
    _generate(llm)
    assert seen == []
    monkeypatch.delenv("TESSELLM_DECODE_OVERLAP")
    assert LLM(tiny_model_dir("llama"), dtype="float32").engine.core.runner.overlap is None


def test_schedule_interleaves_micro_batches(tiny_model_dir, monkeypatch):
    """Both micro-batches' layer-0 attention is queued before the main stream waits for the
    first; then each wait is followed by the next layer's launch of that micro-batch: per
    split step ``side side (wait side)* wait wait``, 2 x layers of each."""
    _overlap_on(monkeypatch)
    llm = LLM(tiny_model_dir("llama"), dtype="float32")
    runner = llm.engine.core.runner
    runner.overlap.streams = streams = CountingStreams()
    _generate(llm)
    layers = len(runner.model.attention_layers())
    one_step = ["side", "side"] + ["wait", "side"] * (2 * layers - 2) + ["wait", "wait"]
    assert len(streams.log) % len(one_step) == 0 and streams.log
    assert streams.log == one_step * (len(streams.log) // len(one_step))


def test_rows_of_a_decode_batch():
    """``sequences`` of a pure-decode batch: the sequences' slices, a query_start_loc prefix,
    their host lists."""
    n, width = 5, 3
    batch = AttentionBatch(
        num_tokens=n, num_seqs=n, num_decodes=n, query_start_loc=torch.arange(n + 1, dtype=torch.int32),
        seq_lens=torch.tensor([4, 9, 2, 7, 5], dtype=torch.int32),
        block_tables=torch.arange(n * width, dtype=torch.int32).view(n, width),
        slot_mapping=torch.tensor([3, 24, 33, 54, 68]), max_query_len=1, max_seq_len=9,
        query_start_loc_host=list(range(n + 1)), seq_lens_host=[4, 9, 2, 7, 5])
    part = sequences(batch, 2, 5)
    assert (part.num_tokens, part.num_seqs, part.num_decodes, part.max_seq_len) == (3, 3, 3, 7)
    assert part.query_start_loc.tolist() == [0, 1, 2, 3]
    assert part.seq_lens.tolist() == [2, 7, 5] and part.seq_lens_host == [2, 7, 5]
    assert part.block_tables.tolist() == [[6, 7, 8], [9, 10, 11], [12, 13, 14]]
    assert part.slot_mapping.tolist() == [33, 54, 68] and part.query_start_loc_host == [0, 1, 2, 3]


def test_sequences_of_a_mixed_batch():
    """``sequences`` of a mixed batch (2 decodes, then chunks of 3 and 2 tokens): the decodes
    keep a prefix; the chunks get token rows 2..6, query_start_loc rebased to 0, 3, 5."""
    qsl = [0, 1, 2, 5, 7]
    batch = AttentionBatch(
        num_tokens=7, num_seqs=4, num_decodes=2, query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor([9, 4, 3, 12], dtype=torch.int32),
        block_tables=torch.arange(8, dtype=torch.int32).view(4, 2),
        slot_mapping=torch.arange(100, 107), max_query_len=3, max_seq_len=12,
        query_start_loc_host=qsl, seq_lens_host=[9, 4, 3, 12])
    dec, pre = sequences(batch, 0, 2), sequences(batch, 2, 4)
    assert (dec.num_tokens, dec.num_seqs, dec.num_decodes, dec.max_query_len, dec.max_seq_len) == (2, 2, 2, 1, 9)
    assert dec.query_start_loc.tolist() == [0, 1, 2] and dec.slot_mapping.tolist() == [100, 101]
    assert (pre.num_tokens, pre.num_seqs, pre.num_decodes, pre.max_query_len, pre.max_seq_len) == (5, 2, 0, 3, 12)
    assert pre.query_start_loc.tolist() == [0, 3, 5] and pre.query_start_loc_host == [0, 3, 5]
    assert pre.slot_mapping.tolist() == [102, 103, 104, 105, 106]
    assert pre.block_tables.tolist() == [[4, 5], [6, 7]] and pre.seq_lens.tolist() == [3, 12]


def test_mixed_steps_split_decodes_from_prefill(tiny_model_dir, want, monkeypatch):
    """steps=mixed (the default) with a 16-token budget: steps of >= 2 decodes and >= 4 prefill
    tokens split into their decodes | their chunks (the first micro-batch: the decode rows), pure
    decode steps stay unsplit; tokens HF's. A step under either minimum runs unsplit."""
    monkeypatch.delenv("TESSELLM_DECODE_OVERLAP_STEPS", raising=False)
    llm = LLM(tiny_model_dir("llama"), dtype="float32", max_num_batched_tokens=16,
              enable_decode_overlap=True, decode_overlap_min_batch=2, decode_overlap_min_prefill=4)
    runner = llm.engine.core.runner
    assert runner.overlap.config.steps == "mixed"
    split, seen = runner.overlap.split, []

    def recorded(batch, model):
        out = split(batch, model)
        seen.append((batch.num_decodes, batch.num_tokens - batch.num_decodes,
                     None if out is None else out.parts[0].rows.stop))
        return out

    runner.overlap.split = recorded
    assert _generate(llm) == want("llama")
    done = [(d, p) for d, p, first in seen if first is not None]
    assert done and all(first == d for d, p, first in seen if first is not None)
    assert all(d >= 2 and p >= 4 for d, p in done)
    assert all(first is None for d, p, first in seen if d < 2 or p < 4)
    assert runner.overlap.splits == {"mixed": len(done), "decode": 0}  # the bench's counts


def test_bad_min_rows_is_refused(monkeypatch):
    from tessellm import envs

    _overlap_on(monkeypatch, min_rows=1)
    with pytest.raises(ValueError, match="TESSELLM_DECODE_OVERLAP_MIN_ROWS"):
        envs.decode_overlap_min_rows()


def _record_parts(runner) -> list[tuple[int, ...]]:
    """Wraps the runner's real ``split`` to record each split step's micro-batch row counts."""
    split, seen = runner.overlap.split, []

    def recorded(batch, model):
        out = split(batch, model)
        if out is not None:
            seen.append(tuple(p.rows.stop - p.rows.start for p in out.parts))
        return out

    runner.overlap.split = recorded
    return seen


def test_engine_args_switch(tiny_model_dir, want, monkeypatch):
    """``enable_decode_overlap`` / ``decode_overlap_steps`` / ``decode_overlap_min_batch`` turn
    the pure-decode split on without the variables: HF's tokens, an odd step (7 rows) split 3 + 4, steps under the minimum unsplit
    (only the 7-row steps split at a minimum of 5: every prompt decodes to the end); the
    argument False wins over the variable on."""
    monkeypatch.delenv("TESSELLM_DECODE_OVERLAP", raising=False)
    llm = LLM(tiny_model_dir("llama"), dtype="float32", enable_decode_overlap=True,
              decode_overlap_steps="decode", decode_overlap_min_batch=5)
    runner = llm.engine.core.runner
    assert runner.overlap is not None and runner.overlap.min_rows == 5
    seen = _record_parts(runner)
    assert _generate(llm) == want("llama")
    assert seen and set(seen) == {(3, 4)}
    _overlap_on(monkeypatch)
    assert LLM(tiny_model_dir("llama"), dtype="float32",
               enable_decode_overlap=False).engine.core.runner.overlap is None


class CarvingStreams(SequentialStreams):
    """One stream, with the optional ``gemm_sm_carveout`` (plugin API 25) logging its scopes."""

    def __init__(self):
        self.held: list[tuple[str, int]] = []

    def gemm_sm_carveout(self, sms: int):
        if not 0 <= sms < 100:
            raise ValueError(f"decode_overlap_sm_carveout={sms}: give 0 .. 99.")
        return self._scope(sms)

    @contextlib.contextmanager
    def _scope(self, sms: int):
        self.held.append(("enter", sms))
        yield
        self.held.append(("exit", sms))


def test_gemm_carveout_scope_per_split_step(tiny_model_dir, want, caplog):
    """A backend whose streams carve out SMs: the scope is held once around each split step's
    layers (entered and left in turn), tokens stay HF's; a carve-out the streams refuse fails
    when the overlap is built; streams without the method (the cpu backend's) warn and run
    uncarved."""
    llm = LLM(tiny_model_dir("llama"), dtype="float32")
    runner = llm.engine.core.runner
    runner.backend = dataclasses.replace(runner.backend, overlap_streams=CarvingStreams)
    runner.overlap = DecodeOverlap.build(runner, OverlapSettings(min_rows=2, sm_carveout=8, steps="all"))
    streams = runner.overlap.streams
    seen = _count_splits(runner)
    assert _generate(llm) == want("llama")
    assert seen and streams.held == [("enter", 8), ("exit", 8)] * len(seen)
    with pytest.raises(ValueError, match="decode_overlap_sm_carveout=100"):
        DecodeOverlap.build(runner, OverlapSettings(min_rows=2, sm_carveout=100))
    plain = LLM(tiny_model_dir("llama"), dtype="float32", enable_decode_overlap=True,
                decode_overlap_min_batch=2, decode_overlap_sm_carveout=8)  # steps: mixed
    assert plain.engine.core.runner.overlap.gemm_scope is None
    assert "decode_overlap_sm_carveout=8 is ignored" in caplog.text


def test_settings_from_args_and_variables(monkeypatch):
    """Each engine argument wins over its variable; unset both: off, 128 rows, no carve-out."""
    for name in ("TESSELLM_DECODE_OVERLAP", "TESSELLM_DECODE_OVERLAP_MIN_ROWS",
                 "TESSELLM_DECODE_OVERLAP_SM_CARVEOUT", "TESSELLM_DECODE_OVERLAP_STEPS",
                 "TESSELLM_DECODE_OVERLAP_MIN_PREFILL"):
        monkeypatch.delenv(name, raising=False)
    assert settings(EngineArgs()) is None
    assert settings(EngineArgs(enable_decode_overlap=True)) == OverlapSettings(128, None, "mixed", 512)
    monkeypatch.setenv("TESSELLM_DECODE_OVERLAP", "1")
    monkeypatch.setenv("TESSELLM_DECODE_OVERLAP_MIN_ROWS", "64")
    monkeypatch.setenv("TESSELLM_DECODE_OVERLAP_SM_CARVEOUT", "16")
    monkeypatch.setenv("TESSELLM_DECODE_OVERLAP_STEPS", "all")
    monkeypatch.setenv("TESSELLM_DECODE_OVERLAP_MIN_PREFILL", "1024")
    assert settings(EngineArgs()) == OverlapSettings(64, 16, "all", 1024)
    assert settings(EngineArgs(decode_overlap_min_batch=256, decode_overlap_sm_carveout=0,
                               decode_overlap_steps="decode", decode_overlap_min_prefill=8)) == \
        OverlapSettings(256, 0, "decode", 8)
    assert settings(EngineArgs(enable_decode_overlap=False)) is None
    monkeypatch.setenv("TESSELLM_DECODE_OVERLAP_SM_CARVEOUT", "-1")
    with pytest.raises(ValueError, match="TESSELLM_DECODE_OVERLAP_SM_CARVEOUT"):
        settings(EngineArgs())
    monkeypatch.setenv("TESSELLM_DECODE_OVERLAP_SM_CARVEOUT", "16")
    monkeypatch.setenv("TESSELLM_DECODE_OVERLAP_STEPS", "prefill")
    with pytest.raises(ValueError, match="TESSELLM_DECODE_OVERLAP_STEPS"):
        settings(EngineArgs())
    for bad in (dict(decode_overlap_min_batch=1), dict(decode_overlap_sm_carveout=-4),
                dict(decode_overlap_min_batch=True), dict(decode_overlap_min_prefill=0),
                dict(decode_overlap_steps="prefill")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            EngineArgs(**bad).validate()


@pytest.mark.slow  # ~75 s in Triton's interpreter; the host tests above cover the split path
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
def test_split_on_emulated_cuda(tiny_model_dir, want):
    """The cuda backend's kernels (Triton's interpreter, host tensors) under both splits (a
    32-token budget: mixed steps, then pure-decode ones): one stream there (no device
    streams), HF's tokens."""
    llm = LLM(tiny_model_dir("llama"), device="cuda", emulate=True, dtype="float32",
              max_num_batched_tokens=32, enable_decode_overlap=True, decode_overlap_steps="all",
              decode_overlap_min_batch=2, decode_overlap_min_prefill=4)
    runner = llm.engine.core.runner
    assert type(runner.overlap.streams) is SequentialStreams
    seen = _record_parts(runner)
    assert _generate(llm) == want("llama")
    assert (3, 4) in seen and len(set(seen)) > 1  # pure-decode halves and mixed splits
