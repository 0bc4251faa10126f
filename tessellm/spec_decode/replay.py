"""Replay proposer (benchmark only): drafts the tokens an earlier identical greedy run produced.

Given the recorded outputs (``replay_path``: a JSON file, or ``replay_records`` inline: a list
of ``{"prompt_token_ids": [...], "output_token_ids": [...]}``), a request whose prompt equals a
recorded one proposes the next ``k`` recorded tokens after its own output so far. It costs
nothing and, for the same greedy run, is always accepted: it measures the ceiling of the verify
path. A request with no recording (or past its end) gets no drafts.
"""

from __future__ import annotations

import json

from tessellm.spec_decode.proposer import Proposal, ProposeInput, Proposer, ProposerContext


def load_records(path_or_records) -> dict[tuple[int, ...], list[int]]:
    records = path_or_records
    if isinstance(path_or_records, str):
        with open(path_or_records) as f:
            records = json.load(f)
    try:
        return {tuple(r["prompt_token_ids"]): list(r["output_token_ids"]) for r in records}
    except (TypeError, KeyError):
        raise ValueError("speculative_config replay records must be a list of objects with "
                         "prompt_token_ids and output_token_ids.") from None


def save_records(path: str, prompts: list[list[int]], outputs: list[list[int]]) -> None:
    """Write a replay file from a greedy run's prompts and outputs (token ids)."""
    with open(path, "w") as f:
        json.dump([{"prompt_token_ids": list(p), "output_token_ids": list(o)}
                   for p, o in zip(prompts, outputs)], f)


class ReplayProposer(Proposer):
    def __init__(self, ctx: ProposerContext):
        super().__init__(ctx)
        self.k = self.config.num_speculative_tokens
        self.records = load_records(self.config.replay_path or self.config.replay_records)
        self.reference: dict[str, list[int]] = {}

    def propose(self, inp: ProposeInput) -> Proposal:
        out = Proposal()
        k = min(self.k, inp.max_drafts)
        for rid, state in zip(inp.order, inp.states):
            if rid not in inp.sampled or k <= 0:
                continue
            ref = self.reference.get(rid)
            if ref is None:
                ref = self.records.get(tuple(state.token_ids[:state.num_prompt_tokens]), [])
                self.reference[rid] = ref
            n = len(state.token_ids) - state.num_prompt_tokens
            drafts = ref[n:n + k]
            if drafts:
                out.token_ids[rid] = drafts
        return out

    def remove_requests(self, request_ids) -> None:
        for rid in request_ids:
            self.reference.pop(rid, None)
