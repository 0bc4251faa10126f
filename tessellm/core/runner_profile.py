"""The model runner's memory profile step (``core/memory_profile.py``): the step the KV cache
is sized after, its prompt logprobs and sampler at their widest, a drafter's forward measured
alone.

A mixin of ``ModelRunner`` (tessellm/core/model_runner.py), which owns the state used here:
``model``, ``backend``, ``device``, ``dtype``, ``block_size``, ``max_model_len`` /
``max_num_seqs``, ``steps`` (the input feed), ``table_width_multiple``, ``pp`` / ``io``
(pipeline stage), ``pooler``, ``mamba`` (recurrent-state slots), ``spec`` (speculative
decoding), ``encoder_cache`` (images), ``sampler`` / ``host_sampling`` / ``vocab_size`` /
``eos_token_ids``; ``allocate_kv_cache`` comes from ``RunnerKVCache``, ``_eager_tensors`` from
``RunnerForward``, ``_metadata`` from ``RunnerGraphs`` and ``_sample`` from ``ModelRunner``.
It sets ``profile_tokens``, ``profile_peak_bytes`` and ``logits_row_bytes``.
"""

from __future__ import annotations

import torch

from tessellm.core.block_table import PersistentBlockTable
from tessellm.core.input_batch import RunnerRequest
from tessellm.core.input_builder import build_inputs
from tessellm.core.runner_output import prompt_logprobs
from tessellm.core.shape_buckets import runner_grad_mode
from tessellm.spec_decode.proposer import StepTensors


class RunnerProfile:
    """``profile_run``: the memory profile's step (see the module docstring)."""

    @runner_grad_mode
    def profile_run(self, num_tokens: int) -> None:
        """The memory profile's step (``core/memory_profile.py``): ``num_tokens`` tokens over
        ``max_num_seqs`` rows, decodes first, prompts of at most ``max_model_len`` (a longer
        one would index rotary tables, sized by the model's context, past their end); then one
        chunk of prompt logprobs (``prompt_logprob_chunk`` rows, top ``PROFILE_LOGPROBS``); the
        logits of its sampled rows through the sampler's widest path, and the greedy argmax;
        with speculative decoding the rejection sampler where drafts carry a distribution, then
        the proposer's own forward (``SpecDecodeRunner.profile``, its peak measured alone too).

        Its K/V go to one block per layer (every table entry is block 0: the values do not
        matter, the shapes do), so the profile leaves no freed cache blocks behind that no
        activation fits. Sets ``profile_peak_bytes`` (the allocator's peak over the step,
        above what was allocated before it; 0 where the device reports none) and
        ``logits_row_bytes``."""
        from tessellm.core.memory_profile import profile_sampling_params, profile_shape
        from tessellm.core.sampling_params import SamplingParams

        bs = self.block_size
        spec_tokens, spec_seqs = 0, None
        if self.spec is not None:
            spec_tokens = self.spec.config.num_speculative_tokens
            spec_seqs = self.spec.config.max_verifying_seqs(self.max_num_seqs)
        shape = profile_shape(num_tokens, self.max_num_seqs, self.max_model_len, spec_tokens,
                              spec_seqs)
        self.profile_tokens = num_tokens = shape.num_tokens
        counts = list(shape.counts)
        tables = PersistentBlockTable(-(-self.max_model_len // bs), rows=len(counts))
        params = SamplingParams(max_tokens=1)
        states = [RunnerRequest(f"profile-{i}", [0] * n, n, params, [0] * -(-n // bs), 0,
                                tables.add([0] * -(-n // bs))) for i, n in enumerate(counts)]
        self.allocate_kv_cache(1, self.dtype)
        before = _allocated(self.device)
        _reset_peak(self.device)
        host = build_inputs(states, counts, [0] * len(counts), tables, bs, self.steps.input_token,
                            self.table_width_multiple)  # the table's stride class of real steps
        ids, positions, attn, _ = self._eager_tensors(host, counts)
        if self.mamba is not None:
            self.mamba.begin_step(states, counts, profile=True)
        hidden = self.model(ids, positions, self._metadata(attn), self.io.dummy(num_tokens))
        rows = torch.arange(num_tokens - shape.sampled_rows, num_tokens, device=hidden.device)
        tensors = None  # a proposer reading the step's hidden states keeps them while it samples
        if self.spec is not None and self.spec.wants_tensors:
            tensors = StepTensors(ids, positions, attn.slot_mapping, attn, rows, None, hidden,
                                  getattr(self.model, "aux_hidden_states", None))
        if self.pp.is_last and self.pooler is None:
            self._profile_prompt_logprobs(hidden, shape.prompt_logprob_rows)
            logits = self.model.compute_logits(hidden[rows])
            del hidden
            self.logits_row_bytes = logits.shape[-1] * logits.element_size()
            if not self.host_sampling:  # greedy's argmax kernel compiles here, not in the first
                self.sampler.argmax(logits)  # greedy step (LLM(...) runs no kernel warm-up)
                self._profile_sampler(logits, profile_sampling_params(logits.shape[-1]))
            del logits
        hidden = None
        step_peak = 0
        if self.spec is not None:  # then its proposal: a drafter's own forward, measured alone
            self.backend.synchronize()
            step_peak = _peak(self.device)
            _reset_peak(self.device)
            start = _allocated(self.device)
            self.spec.profile(counts, bs, tensors)
            self.backend.synchronize()
            self.spec.profile_peak_bytes = max(0, _peak(self.device) - start)
            self.spec.profile_tokens = num_tokens
        del tensors
        if self.encoder_cache is not None:  # the vision tower's peak too
            self.encoder_cache.profile(num_tokens)
        self.backend.synchronize()
        self.profile_peak_bytes = max(0, _peak(self.device) - before, step_peak - before)
        self.allocate_kv_cache(0, self.dtype)

    def _profile_prompt_logprobs(self, hidden: torch.Tensor, n: int) -> None:
        """One chunk of prompt logprobs over ``n`` of ``hidden``'s rows, top
        ``PROFILE_LOGPROBS`` each, as a step with a long prompt asking for them computes it."""
        from tessellm.core.memory_profile import PROFILE_LOGPROBS
        from tessellm.core.sampling_params import SamplingParams

        if n < 1:
            return
        k = min(PROFILE_LOGPROBS, self.vocab_size)
        state = RunnerRequest("profile-prompt-logprobs", [0] * (n + 1), n + 1,
                              SamplingParams(prompt_logprobs=k, max_tokens=1), [], 0)
        prompt_logprobs(self.model, hidden, [(state, 0, 0, n)], n)

    def _profile_sampler(self, logits: torch.Tensor, params) -> None:
        """The sampler over ``logits``' rows, each a request using ``params`` (one sampled
        output token so far: penalties read it); then, where drafts carry their distribution,
        the rejection sampler over the same rows as verifying requests (``_sample``)."""
        from tessellm.core.sampling_metadata import build_sampling_batch

        rows = [RunnerRequest(f"profile-sample-{i}", [0, 1], 1, params, [], 1)
                for i in range(logits.shape[0])]
        batch = build_sampling_batch(rows, lambda i: 0, self.sampler.device, self.vocab_size,
                                     self.eos_token_ids)
        state = self.sampler.generator.get_state()  # the engine's draws stay those of its seed
        self.sampler(logits, batch)
        del batch
        verify = (self.spec.profile_verify_rows(logits.shape[0], logits.shape[-1], params,
                                                self.sampler.device) if self.spec is not None else None)
        if verify is not None:  # drafts with their distribution: the rejection sampler's rows
            rows, sampling, starts = verify
            batch = build_sampling_batch(rows, lambda i: 0, self.sampler.device, self.vocab_size,
                                         self.eos_token_ids)
            self._sample(logits, batch, sampling, starts)
        self.sampler.generator.set_state(state)


def _memory_stats(device: torch.device) -> dict:
    """``torch.accelerator``'s allocator statistics for ``device``; {} where it has none (the
    cpu, XLA, a torch without them)."""
    acc = getattr(torch, "accelerator", None)
    if (device.type == "cpu" or acc is None or not hasattr(acc, "memory_stats")
            or not acc.is_available() or acc.current_accelerator().type != device.type):
        return {}
    return acc.memory_stats(device)


def _allocated(device: torch.device) -> int:
    """Bytes the device's caching allocator has handed out (0 where it reports none)."""
    return int(_memory_stats(device).get("allocated_bytes.all.current", 0))


def _peak(device: torch.device) -> int:
    return int(_memory_stats(device).get("allocated_bytes.all.peak", 0))


def _reset_peak(device: torch.device) -> None:
    if _memory_stats(device):
        torch.accelerator.reset_peak_memory_stats(device)
