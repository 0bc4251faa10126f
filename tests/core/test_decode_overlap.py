"""The decode micro-batch overlap (``TESSELLM_DECODE_OVERLAP``, core/decode_overlap.py) on the
host: the split schedule runs on one stream there, and its greedy tokens equal HF's in float32
(as the unsplit path's do), with prefix-cache hits and with chunked prefill (mixed steps run
unsplit; the pure-decode steps around them split)."""

from __future__ import annotations

import random

import pytest
import torch

from tessellm import LLM, SamplingParams
from tessellm.backends.reference.streams import SequentialStreams
from tessellm.core.attention_batch import AttentionBatch
from tessellm.core.decode_overlap import rows
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


def _overlap_on(monkeypatch, min_rows: int = 2) -> None:
    monkeypatch.setenv("TESSELLM_DECODE_OVERLAP", "1")
    monkeypatch.setenv("TESSELLM_DECODE_OVERLAP_MIN_ROWS", str(min_rows))


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
    """``rows``: the sequences' slices, a query_start_loc prefix, their host lists."""
    n, width = 5, 3
    batch = AttentionBatch(
        num_tokens=n, num_seqs=n, num_decodes=n, query_start_loc=torch.arange(n + 1, dtype=torch.int32),
        seq_lens=torch.tensor([4, 9, 2, 7, 5], dtype=torch.int32),
        block_tables=torch.arange(n * width, dtype=torch.int32).view(n, width),
        slot_mapping=torch.tensor([3, 24, 33, 54, 68]), max_query_len=1, max_seq_len=9,
        query_start_loc_host=list(range(n + 1)), seq_lens_host=[4, 9, 2, 7, 5])
    part = rows(batch, 2, 5)
    assert (part.num_tokens, part.num_seqs, part.num_decodes, part.max_seq_len) == (3, 3, 3, 7)
    assert part.query_start_loc.tolist() == [0, 1, 2, 3]
    assert part.seq_lens.tolist() == [2, 7, 5] and part.seq_lens_host == [2, 7, 5]
    assert part.block_tables.tolist() == [[6, 7, 8], [9, 10, 11], [12, 13, 14]]
    assert part.slot_mapping.tolist() == [33, 54, 68] and part.query_start_loc_host == [0, 1, 2, 3]


def test_bad_min_rows_is_refused(monkeypatch):
    from tessellm import envs

    _overlap_on(monkeypatch, min_rows=1)
    with pytest.raises(ValueError, match="TESSELLM_DECODE_OVERLAP_MIN_ROWS"):
        envs.decode_overlap_min_rows()
