"""vLLM's ``VLLM_COMPUTE_NANS_IN_LOGITS`` (tessellm's TESSELLM_COMPUTE_NANS_IN_LOGITS, vLLM's
name accepted): the sampler counts each row's NaN logits, only when asked, and /metrics
(``LLM.get_metrics()``) counts the requests that had any when they finish, as vLLM's
``vllm:corrupted_requests{model_name, engine}``. NaN logits are forced through a custom logits
processor on a tiny model (tests.sampling.logits_procs.NanProcessor)."""

from __future__ import annotations

import weakref

import pytest
import torch

from tessellm import LLM, SamplingParams, envs
from tessellm.core.sampler import Sampler, SamplingBatch

ENGINE = dict(device="cpu", dtype="float32", seed=0, block_size=4, num_kv_blocks=64, disable_log_stats=False,
              logits_processors=["tests.sampling.logits_procs:NanProcessor"])


def _greedy(**extra_args) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, extra_args=extra_args or None)


def test_the_switch_and_its_vllm_alias(monkeypatch):
    for name in ("TESSELLM_COMPUTE_NANS_IN_LOGITS", "VLLM_COMPUTE_NANS_IN_LOGITS"):
        monkeypatch.delenv(name, raising=False)
    assert envs.compute_nans_in_logits() is False
    monkeypatch.setenv("VLLM_COMPUTE_NANS_IN_LOGITS", "1")
    assert envs.compute_nans_in_logits() is True
    monkeypatch.setenv("TESSELLM_COMPUTE_NANS_IN_LOGITS", "0")  # ours wins
    assert envs.compute_nans_in_logits() is False
    monkeypatch.setenv("TESSELLM_COMPUTE_NANS_IN_LOGITS", "maybe")
    with pytest.raises(ValueError, match="TESSELLM_COMPUTE_NANS_IN_LOGITS='maybe' is not understood"):
        envs.compute_nans_in_logits()


def test_the_sampler_counts_nans_per_row_only_when_on():
    logits = torch.randn(3, 16)
    logits[1, 2] = logits[1, 7] = float("nan")
    batch = SamplingBatch(temperature=None, all_greedy=True, top_p=None, top_k=None, min_p=None)
    assert Sampler(torch.device("cpu"))(logits, batch).num_nans is None  # off: nothing counted
    assert Sampler(torch.device("cpu"), compute_nans=True)(logits, batch).num_nans.tolist() == [0, 2, 0]
    banned = SamplingBatch(temperature=None, all_greedy=True, top_p=None, top_k=None, min_p=None,
                           banned=[(1, [2, 7])])  # edited away, still the model's NaNs
    assert Sampler(torch.device("cpu"), compute_nans=True)(logits, banned).num_nans.tolist() == [0, 2, 0]


class _CountingNan:
    """Custom processors as the sampler sees them (``SamplingBatch.processors``), counting
    their applications; row 0 gets a NaN at token 1."""

    changes_argmax = True

    def __init__(self):
        self.calls = 0

    def apply(self, logits: torch.Tensor, argmax_invariant: bool) -> torch.Tensor:
        self.calls += 1
        logits[0, 1] = float("nan")
        return logits


def test_verifying_drafts_applies_the_processors_once_and_counts_their_nans():
    """Rejection sampling with the count on: the processors that change the argmax run once a
    step, as with the count off (they ran a second time to count), and their NaNs count."""
    counts = []
    for on in (False, True):
        procs = _CountingNan()
        batch = SamplingBatch(temperature=None, all_greedy=True, top_p=None, top_k=None,
                              min_p=None, processors=procs)
        out = Sampler(torch.device("cpu"), compute_nans=on).verify(
            torch.randn(2, 16), batch, torch.tensor([3, -1]), torch.full((2, 16), 1 / 16),
            torch.tensor([True, False]))
        counts.append((procs.calls, None if out.num_nans is None else out.num_nans.tolist()))
    assert counts == [(1, None), (1, [1, 0])]


class _KeepsArgmaxNan:
    """Custom processors that keep the argmax (applied to the scaled logits of a batch that
    samples), putting a NaN at token 1 of every row: the argmax does not move (NaN is never
    taken), but the sampled rows draw from the NaN logits."""

    changes_argmax = False
    keeps_argmax = True

    def apply(self, logits: torch.Tensor, argmax_invariant: bool) -> torch.Tensor:
        assert argmax_invariant
        logits[:, 1] = float("nan")
        return logits


def test_nans_from_processors_that_keep_the_argmax_are_counted_where_sampled():
    """Counted in the logits each row is sampled from: the sampled row's NaN (a processor that
    keeps the argmax put it there) counts, the greedy row beside it (its token the argmax of
    logits the processor never touched) has none; verifying drafts counts the same."""
    logits, drafts = torch.randn(2, 16), torch.tensor([3, -1])
    batch = SamplingBatch(temperature=torch.tensor([0.0, 1.0]), all_greedy=False, top_p=None,
                          top_k=None, min_p=None, processors=_KeepsArgmaxNan())
    sampler = Sampler(torch.device("cpu"), compute_nans=True)
    assert sampler(logits.clone(), batch).num_nans.tolist() == [0, 1]
    verified = sampler.verify(logits.clone(), batch, drafts, torch.full((2, 16), 1 / 16), torch.tensor([True, False]))
    assert verified.num_nans.tolist() == [0, 1]


class _KeepsArgmaxWatched:
    """A processor that keeps the argmax and changes nothing, keeping a weak reference to the
    scaled logits it is applied to (the tensor ``_scaled`` returns)."""

    changes_argmax = False
    keeps_argmax = True

    def apply(self, logits: torch.Tensor, argmax_invariant: bool) -> torch.Tensor:
        self.scaled = weakref.ref(logits)
        return logits


class _WatchingSampler(Sampler):
    """Records whether the scaled logits are still alive when the logprobs are computed."""

    def _logprobs(self, raw, tokens, batch, out) -> None:
        self.scaled_alive = batch.processors.scaled() is not None
        super()._logprobs(raw, tokens, batch, out)


@pytest.mark.parametrize("compute_nans", [False, True])
def test_the_scaled_logits_are_not_held_through_the_logprobs(compute_nans):
    """The NaN count reads each sampled row's scaled logits ([B, V] float32); the sampler lets
    them go before the logprobs' own [B, V] work, count or not, so the peak memory of a step
    is what it was before the count (nothing new kept while TESSELLM_COMPUTE_NANS_IN_LOGITS is
    off). Sampling and verifying drafts alike."""
    logits, drafts = torch.randn(2, 16), torch.tensor([3, -1])
    batch = SamplingBatch(temperature=torch.tensor([0.0, 1.0]), all_greedy=False, top_p=None,
                          top_k=None, min_p=None, processors=_KeepsArgmaxWatched(), max_num_logprobs=2)
    sampler = _WatchingSampler(torch.device("cpu"), compute_nans=compute_nans)
    assert sampler(logits.clone(), batch).sampled_logprob is not None
    assert sampler.scaled_alive is False
    sampler.scaled_alive = None
    sampler.verify(logits.clone(), batch, drafts, torch.full((2, 16), 1 / 16), torch.tensor([True, False]))
    assert sampler.scaled_alive is False


def _corrupted(llm) -> list:
    return [m for m in llm.get_metrics() if m.name.endswith("corrupted_requests")]


def test_corrupted_requests_counted_in_metrics(tiny_model_dir, monkeypatch, caplog):
    monkeypatch.setenv("TESSELLM_COMPUTE_NANS_IN_LOGITS", "1")
    caplog.set_level("WARNING", logger="tessellm.metrics.corrupted_log")
    prompts = [{"prompt_token_ids": [5, 9, 11]}, {"prompt_token_ids": [7, 3]}, {"prompt_token_ids": [4, 4, 8]}]
    with LLM(tiny_model_dir("llama"), metrics_names="vllm", **ENGINE) as llm:
        outs = llm.generate(prompts, [_greedy(nan=True), _greedy(), _greedy()], use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 3 for o in outs)  # the engine served every request
        (metric,) = _corrupted(llm)
        assert (metric.name, metric.value) == ("vllm:corrupted_requests", 1)
        assert set(metric.labels) == {"model_name", "engine"}
        llm.generate(prompts[1:], _greedy(), use_tqdm=False)
        assert _corrupted(llm)[0].value == 1  # clean requests add nothing
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Corrupted:")]
    assert len(lines) == 1 and lines[0].startswith("Corrupted: 1 reqs "), lines  # vLLM's line


def test_the_corrupted_line_is_written_when_there_are_some_at_most_once_an_interval(caplog):
    from tessellm.metrics.corrupted_log import CorruptedLog

    now = [100.0]
    log = CorruptedLog(interval_s=10.0, clock=lambda: now[0])
    caplog.set_level("WARNING", logger="tessellm.metrics.corrupted_log")

    def lines() -> list:
        return [r.getMessage() for r in caplog.records]

    log.maybe_log()
    assert lines() == []  # none: no line
    log.add()
    log.maybe_log()  # the first at once
    log.add()
    now[0] = 105.0
    log.maybe_log()  # within the interval: counted, not written
    now[0] = 112.0
    log.maybe_log()
    log.maybe_log()
    assert [line.split(" (")[0] for line in lines()] == ["Corrupted: 1 reqs", "Corrupted: 1 reqs"]
    assert lines()[0].endswith("since start") and lines()[1].endswith("in the last 12 s")


def test_no_series_when_off(tiny_model_dir, monkeypatch):
    monkeypatch.delenv("TESSELLM_COMPUTE_NANS_IN_LOGITS", raising=False)
    monkeypatch.delenv("VLLM_COMPUTE_NANS_IN_LOGITS", raising=False)
    with LLM(tiny_model_dir("llama"), metrics_names="vllm", **ENGINE) as llm:
        llm.generate([{"prompt_token_ids": [5, 9, 11]}], _greedy(nan=True), use_tqdm=False)
        assert _corrupted(llm) == [] and llm.engine.core.runner.sampler.compute_nans is False
