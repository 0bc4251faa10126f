"""The sampling stage of a step never makes the host wait for the device.

On an accelerator, ``torch.tensor(values, device=...)`` and ``cpu_tensor.to(device)`` copy from
pageable memory and wait for every kernel queued before them (the step's forward); ``.item()``,
``.tolist()``, ``bool(t)``, ``.nonzero()`` and boolean-mask indexing of a device tensor wait for
its value. ``Transfers`` records every such call while a step's sampling batch is built and
sampled, with the sampler in its accelerator forms (``on_host`` False) on CPU tensors: the calls
are the same Python whatever the device, so a blocking upload or read put back into the step
path shows here without a GPU. Host lists reach the device through ``sampler.upload`` (pinned,
non-blocking on CUDA; on the CPU a plain ``torch.tensor`` with no device: not recorded).
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from tessellm.core.input_batch import RunnerRequest
from tessellm.core.sampler import Sampler, upload, upload_tensor
from tessellm.core.sampling_metadata import build_sampling_batch
from tessellm.core.sampling_params import SamplingParams

V = 64
EOS = 2
READS = {"item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__"}


class Transfers(TorchFunctionMode):
    """Records the calls that block the host on an accelerator: ``uploads`` (a host value
    given to ``torch.tensor`` / ``as_tensor`` with a device, ``.to(device)`` without
    ``non_blocking``) and ``reads`` (a tensor's value read on the host, a boolean mask
    indexing a tensor: its result's size is data-dependent)."""

    def __init__(self):
        super().__init__()
        self.uploads: list[str] = []
        self.reads: list[str] = []
        self.sites: list[tuple[str, str, str]] = []  # (phase, calling file in tessellm/, name)
        self.phase = ""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        kind = None
        if name in ("tensor", "as_tensor") and kwargs.get("device") is not None:
            kind = self.uploads
        elif name == "to" and _names_device(args[1:], kwargs) and not kwargs.get("non_blocking"):
            kind = self.uploads
        elif name in READS:
            kind = self.reads
        elif name in ("__getitem__", "__setitem__") and _has_bool_mask(args[1]):
            kind, name = self.reads, name + "[bool mask]"
        if kind is not None:
            kind.append(name)
            caller = sys._getframe(1).f_code.co_filename
            self.sites.append((self.phase, caller.split("tessellm/", 1)[-1], name))
        return func(*args, **kwargs)


def _names_device(args, kwargs) -> bool:
    return "device" in kwargs or any(isinstance(a, (str, torch.device)) for a in args)


def _has_bool_mask(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


def _mixed_rows() -> list[RunnerRequest]:
    """One request per sampling feature, prompt [10 11 12], output so far [20 21 21]."""
    kinds = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, logit_bias={7: 100.0}),
        SamplingParams(temperature=0.0, logit_bias={7: 100.0}, bad_words_token_ids=[[21, 7]]),
        SamplingParams(temperature=0.0, min_tokens=10, logit_bias={EOS: 100.0}),
        SamplingParams(temperature=0.0, allowed_token_ids=[30, 31]),
        SamplingParams(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5,
                       frequency_penalty=0.25),
        SamplingParams(temperature=0.8, top_k=5, top_p=0.9, seed=3),
        SamplingParams(temperature=1.2, top_p=0.7, min_p=0.05, logprobs=3),
        SamplingParams(temperature=0.7, logprobs=V),  # the whole vocabulary
        SamplingParams(temperature=0.0, logprob_token_ids=[5, 9]),
    ]
    return [RunnerRequest(f"r{i}", [10, 11, 12, 20, 21, 21], 3, p, [], 5) for i, p in enumerate(kinds)]


def _sample_step(rows: list[RunnerRequest], logits: torch.Tensor):
    sampler = Sampler(torch.device("cpu"), seed=0)
    sampler.on_host = False  # the accelerator's forms: sync-free choices, on CPU tensors
    batch = build_sampling_batch(rows, lambda i: 3, torch.device("cpu"), V, (EOS,))
    return batch, sampler(logits, batch)


def test_a_mixed_sampling_step_neither_waits_for_uploads_nor_reads_back():
    rows = _mixed_rows()
    torch.manual_seed(0)
    logits = torch.randn(len(rows), V)
    with Transfers() as seen:
        batch, out = _sample_step(rows, logits)
    # every per-row parameter became a device tensor, every edit applied: the step has them all
    assert batch.temperature is not None and batch.top_k is not None and batch.top_p is not None
    assert batch.min_p is not None and batch.repetition is not None and batch.allowed_rows == [4]
    assert batch.logit_bias and batch.banned and batch.full_logprob_rows == [8]
    assert batch.id_logprob_rows == [9]
    assert seen.uploads == []
    assert seen.reads == []  # the sampled ids come back once, in the runner's readback
    tokens = out.token_ids.tolist()
    assert tokens[0] == int(logits[0].argmax())
    assert tokens[1] == 7  # logit bias
    assert tokens[2] != 7  # the bad word [21, 7] ends the output: its last token is banned
    assert tokens[3] != EOS  # before min_tokens
    assert tokens[4] in (30, 31)
    assert out.full_ids.shape == (1, V) and out.id_logprobs.shape == (1, 2)


def test_penalty_inputs_scattered_on_the_device_count_the_history():
    """The flat (row, token) uploads give what a row-by-row build gave: counts per output
    token, the prompt's tokens marked; the greedy penalised token is the reference's."""
    rows = _mixed_rows()
    torch.manual_seed(1)
    logits = torch.randn(len(rows), V)
    batch, out = _sample_step(rows, logits)
    counts = torch.zeros(len(rows), V)
    counts[:, 20], counts[:, 21] = 1.0, 2.0
    assert torch.equal(batch.output_counts, counts)
    assert batch.prompt_mask.nonzero()[:, 1].unique().tolist() == [10, 11, 12]
    row = logits[5].clone()
    seen = torch.tensor([10, 11, 12, 20, 21])
    row[seen] = torch.where(row[seen] > 0, row[seen] / 1.3, row[seen] * 1.3)
    row -= 0.25 * counts[5] + 0.5 * (counts[5] > 0).float()
    assert out.token_ids[5].item() == int(row.argmax())


def test_upload_on_the_cpu_is_the_host_tensor_itself():
    """No device given to torch (nothing to copy on the CPU), the values and dtype kept."""
    with Transfers() as seen:
        ids = upload([3, 1], "cpu")
        probs = upload([0.5], torch.device("cpu"), torch.float32)
        host = torch.arange(3)
        same = upload_tensor(host, "cpu")
    assert seen.uploads == [] and same is host
    assert ids.dtype == torch.int64 and ids.tolist() == [3, 1] and probs.dtype == torch.float32


def test_the_recorder_sees_the_blocking_forms():
    """The check above can fail: the forms the step path must not use are recorded."""
    x = torch.arange(4)
    with Transfers() as seen:
        torch.tensor([1, 2], device="cpu")
        x.to("cpu")
        x.to("cpu", non_blocking=True)  # queued: not recorded
        x.tolist()
        bool(x.any())
        x[x > 1]
    assert seen.uploads == ["tensor", "to"]
    assert seen.reads == ["tolist", "__bool__", "__getitem__[bool mask]"]


class _Head(torch.nn.Module):
    """An LM head: the part of a model ``prompt_logprobs`` calls (``compute_logits``)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.proj = torch.nn.Linear(hidden, V, bias=False)

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h)


def test_prompt_logprobs_read_back_once_per_chunk_not_per_row():
    """Prompt logprobs come back as three reads a chunk (ranks, the prompt tokens' logprobs,
    the top k), whatever its rows; the values are the log-softmax's."""
    from tessellm.core.runner_output import prompt_logprobs

    torch.manual_seed(2)
    head, hidden = _Head(8), torch.randn(6, 8)
    state = RunnerRequest("p", [3, 9, 4, 1, 7, 5, 2], 7, SamplingParams(prompt_logprobs=2), [], 0)
    with torch.no_grad(), Transfers() as seen:
        prompt_logprobs(head, hidden, [(state, 0, 0, 6)], chunk=4)  # chunks of 4 and 2 rows
    assert seen.uploads == []
    assert seen.reads == ["tolist"] * 8  # 2 chunks x (ranks, chosen, top values, top ids)
    ref = torch.log_softmax(head.compute_logits(hidden).detach(), dim=-1)
    for j, (token, logprob, rank, top) in enumerate(state.prompt_logprobs):
        assert token == state.token_ids[j + 1]
        assert logprob == pytest.approx(ref[j, token].item(), abs=1e-5)  # a 4-row matmul vs 6
        assert rank == int((ref[j] > ref[j, token]).sum()) + 1
        assert [t for t, _ in top] == ref[j].topk(2).indices.tolist()


STEP_PATH = ("core/", "sample/", "spec_decode/", "structured_output/")


def test_a_whole_step_reads_back_only_its_sampled_ids(tiny_model_dir):
    """Steps of a mixed batch on an async engine, the sampler in its accelerator forms: while a
    step is launched (inputs, forward, sampling), nothing in the engine's step path uploads
    blocking or reads a tensor; the reads come when a step is resolved, one ``tolist`` of its
    sampled ids each (step_pipeline) and the logprobs' host copies (runner_output). Not the step
    path: the CPU backend's attention (host code) and the first-use plugin probes
    (backends/checked.py, used up by the first, unrecorded, generate)."""
    from tessellm import LLM

    prompt = {"prompt_token_ids": [5, 17, 42, 99, 3, 250]}
    with LLM(tiny_model_dir("llama"), device="cpu", dtype="float32", seed=0, async_scheduling=True,
             num_kv_blocks=64) as llm:
        runner = llm.engine.core.runner
        runner.sampler.on_host = False
        greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        reference = llm.generate([prompt], greedy, use_tqdm=False)[0].outputs[0].token_ids
        seen, launch, resolve = Transfers(), runner.execute_async, runner.steps.resolve
        resolved = []

        def in_phase(phase, fn):
            def call(*args):
                outer, seen.phase = seen.phase, phase
                try:
                    with seen:
                        return fn(*args)
                finally:
                    seen.phase = outer
            return call

        def counted(handle):
            resolved.append(handle)
            return in_phase("resolve", resolve)(handle)

        runner.execute_async, runner.steps.resolve = in_phase("launch", launch), counted
        kinds = [{}, dict(temperature=0.8, top_k=5, top_p=0.9, seed=1),
                 dict(temperature=1.0, min_p=0.05, logprobs=2), dict(logit_bias={7: 100.0}),
                 dict(temperature=0.7, allowed_token_ids=[30, 31, 40]),
                 dict(temperature=0.7, repetition_penalty=1.2, min_tokens=3)]
        params = [SamplingParams(**{"temperature": 0, "max_tokens": 6, "ignore_eos": True, **k}) for k in kinds]
        outs = llm.generate([prompt] * len(params), params, use_tqdm=False)
        runner.execute_async, runner.steps.resolve = launch, resolve
    step_path = [site for site in seen.sites if site[1].startswith(STEP_PATH)]
    assert [site for site in step_path if site[0] == "launch"] == []
    assert seen.uploads == []
    readback = [(file, name) for phase, file, name in step_path if file == "core/step_pipeline.py"]
    assert readback == [("core/step_pipeline.py", "tolist")] * len(resolved) and resolved
    assert {file for _, file, _ in step_path} <= {"core/step_pipeline.py", "core/runner_output.py"}
    assert outs[0].outputs[0].token_ids == reference  # greedy row: the plain run's tokens
    assert outs[3].outputs[0].token_ids == [7] * 6  # logit bias
    assert set(outs[4].outputs[0].token_ids) <= {30, 31, 40}
