"""The model runner's speculative part: calls the proposer after each step and prepares the
verification of drafts that carry a draft distribution.

Owned by ``ModelRunner`` (``runner.spec``, None without speculation). Per step::

    execute_async:  drop(sched)                        finished / preempted -> proposer forgets
                    forward -> keep(...)               device tensors, when the proposer wants them
                    verify_rows(...)                   draft ids / q per sampled row, or None
                    record(handle, ...)                what propose() will need
    collect:        propose(handle, live)              -> out.spec_token_ids, draft probs kept
    (a step ahead, async scheduling: start_ahead(...) after resolving the steps in flight)
    (a step that sampled nothing proposes at once: a draft model still fills its KV cache)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from tessellm.core.sampler import upload_tensor
from tessellm.spec_decode.config import SpeculativeConfig
from tessellm.spec_decode.proposer import ProposeInput, Proposer, StepTensors


@dataclass
class PendingProposal:
    """What a launched step leaves for its proposer (read once the step resolves)."""

    order: list[str]
    states: list
    counts: list[int]
    verified: dict[str, list[int]]
    tensors: Optional[StepTensors]


class SpecDecodeRunner:
    def __init__(self, config: SpeculativeConfig, proposer: Proposer, max_num_seqs: int = 256):
        self.config = config
        self.proposer = proposer
        self.max_num_seqs = max_num_seqs
        self.num_lookahead_tokens = config.num_lookahead_tokens
        # Set by the memory profile (``profile``): the proposer's peak above what was allocated
        # before it (0: not measured here), over the profile step's tokens.
        self.profile_peak_bytes = 0
        self.profile_tokens = 0

    @property
    def wants_tensors(self) -> bool:
        from tessellm.spec_decode.proposer import wants_step_tensors

        return wants_step_tensors(self.proposer)

    def attention_layers(self) -> list:
        return self.proposer.attention_layers()

    def drop(self, sched) -> None:
        if sched.dropped_request_ids:
            self.proposer.remove_requests(sched.dropped_request_ids)

    def record(self, handle, order, states, counts, sched, tensors: Optional[StepTensors]) -> None:
        if tensors is not None and handle.sampled is not None:
            tensors.sampled_token_ids = handle.sampled.token_ids
        verified = {st.request_id: list(st.spec_token_ids) for st in states if st.spec_token_ids}
        handle.pending_proposal = PendingProposal(list(order), list(states), list(counts),
                                                  verified, tensors)

    def propose(self, handle, live: dict) -> None:
        """Draft for the next step from a resolved step; the drafts go out with its output and
        stay on the states (``proposed``) for a step ahead. ``live``: the runner's requests; a
        request dropped since the step launched (preempted, finished) gets none."""
        pending = getattr(handle, "pending_proposal", None)
        if pending is None:
            return
        handle.pending_proposal = None
        out = handle.out
        keep = [i for i, st in enumerate(pending.states) if live.get(st.request_id) is st]
        order = [pending.order[i] for i in keep]
        states = [pending.states[i] for i in keep]
        inp = ProposeInput(order, states, [pending.counts[i] for i in keep], out.sampled,
                           pending.verified, self.config.num_drafts(len(pending.order)), pending.tensors)
        proposal = self.proposer.propose(inp) if keep else None
        for st in states:
            drafts = proposal.token_ids.get(st.request_id) if st.request_id in out.sampled else None
            st.proposed = list(drafts) if drafts else []
            if st.proposed:
                out.spec_token_ids[st.request_id] = list(drafts)
                if st.request_id in proposal.draft_probs:
                    st.draft_probs = proposal.draft_probs[st.request_id]

    def start_ahead(self, sched, requests: dict, out) -> tuple[dict, dict]:
        """Steps ahead (``SchedulerOutput.spec_ahead``, core/spec_ahead.py), once the steps in
        flight are resolved: each starts after its last accepted token and verifies at most
        the reserved number of its proposer's drafts. The step's (scheduled, sampled) counts."""
        scheduled, sampled = dict(sched.num_scheduled_tokens), dict(sched.num_sampled_tokens)
        for rid, k in sched.spec_ahead.items():
            st = requests[rid]
            st.spec_token_ids, st.proposed = st.proposed[:k], []
            st.num_computed_tokens = len(st.token_ids) - 1
            scheduled[rid] = sampled[rid] = 1 + len(st.spec_token_ids)
            out.spec_ahead_drafts[rid] = len(st.spec_token_ids)
        return scheduled, sampled

    def verify_rows(self, sampling_states, starts, vocab: int, device: torch.device):
        """(draft ids [R], draft probs [R, V], has probs [R]) for a step in which some request
        verifies drafts with a draft distribution; None when every draft is a point mass (the
        runner's sample-and-match is then exactly this rejection sampler with one-hot q)."""
        if not any(st.draft_probs is not None and st.spec_token_ids for st in sampling_states):
            return None
        num_rows = starts[-1]
        ids = torch.full((num_rows,), -1, dtype=torch.int64)
        has = torch.zeros(num_rows, dtype=torch.bool)
        probs = torch.zeros(num_rows, vocab, dtype=torch.float32, device=device)
        for i, st in enumerate(sampling_states):
            k = starts[i + 1] - starts[i] - 1
            if k <= 0:
                continue
            ids[starts[i]:starts[i] + k] = torch.tensor(st.spec_token_ids[:k])
            if st.draft_probs is not None:
                probs[starts[i]:starts[i] + k] = st.draft_probs[:k].to(device, torch.float32)
                has[starts[i]:starts[i] + k] = True
        for st in sampling_states:
            st.draft_probs = None  # used once
        return upload_tensor(ids, device), probs, upload_tensor(has, device)


    # -- the memory profile (core/memory_profile.py) -----------------------------------------

    def profile_verify_rows(self, num_rows: int, vocab: int, params, device: torch.device):
        """The profile step's sampled rows as verifying requests for the rejection sampler:
        (rows, sampling states, starts) as ``_sampled_rows`` gives them, every request
        verifying k drafts (the last what rows are left) with a draft distribution held on
        the device, as proposals leave them; None where the proposer's drafts are point masses
        (the runner's sample-and-match then uses the sampler, never ``Sampler.verify``)."""
        from tessellm.core.input_batch import RunnerRequest

        if not self.proposer.draft_distributions:
            return None
        q = self.config.num_speculative_tokens + 1
        rows, sampling, starts = [], [], [0]
        for i, first in enumerate(range(0, num_rows, q)):
            n = min(q, num_rows - first)
            st = RunnerRequest(f"profile-verify-{i}", [0, 1], 1, params, [], 1,
                               spec_token_ids=[0] * (n - 1),
                               draft_probs=torch.full((q - 1, vocab), 1.0 / vocab, device=device))
            rows.extend([st] * n)
            sampling.append(st)
            starts.append(starts[-1] + n)
        return rows, sampling, starts

    def profile(self, counts: list[int], block_size: int, tensors: Optional[StepTensors]) -> None:
        """The proposal after the profile step (``Proposer.profile``): row i a request whose
        ``counts[i]`` tokens from position 0 were just computed and one token sampled (a row
        filling the context samples none: a prompt chunk), each wanting k drafts, with blocks
        for them (every one block 0, as the profile step's: the K/V values do not matter).
        ``tensors``: the step's, for a proposer that reads them."""
        from tessellm.core.input_batch import RunnerRequest
        from tessellm.core.sampling_params import SamplingParams

        k = self.config.num_speculative_tokens
        params = SamplingParams(max_tokens=k + 1)
        context = self.proposer.ctx.max_model_len
        order = [f"profile-{i}" for i in range(len(counts))]
        states = [RunnerRequest(rid, [0] * (n + (n < context)), n, params,
                                [0] * -(-(n + 1 + k) // block_size), n)
                  for rid, n in zip(order, counts)]
        sampled = {rid: [0] for rid, n in zip(order, counts) if n < context}
        self.proposer.profile(ProposeInput(order, states, list(counts), sampled, {}, k, tensors))

    def graph_memory_estimate(self, logits_row_bytes: int) -> int:
        """The proposer's graphs' bytes (``Proposer.graph_memory_estimate``), from its profile."""
        per_token = self.profile_peak_bytes / max(1, self.profile_tokens)
        return self.proposer.graph_memory_estimate(logits_row_bytes, per_token)


def build_spec_decode(args, model, kernel, backend, device, dtype, max_model_len: int,
                      vocab_size: int, tp=None, registry=None) -> Optional[SpecDecodeRunner]:
    """The runner's speculative part for ``args.speculative_config`` (None when unset): the
    proposer built and loaded in this worker; the target told which layers' inputs to keep."""
    from tessellm.spec_decode.config import parse_speculative_config
    from tessellm.spec_decode.proposer import ProposerContext, make_proposer

    config = parse_speculative_config(args.speculative_config)
    if config is None:
        return None
    ctx = ProposerContext(config, model, kernel, backend, device, dtype, args.block_size,
                          max_model_len, vocab_size, args.max_num_seqs, tp, registry, args)
    proposer = make_proposer(ctx)
    if proposer.aux_hidden_layers:
        model.aux_hidden_layers = tuple(proposer.aux_hidden_layers)
    return SpecDecodeRunner(config, proposer, args.max_num_seqs)
