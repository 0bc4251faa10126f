"""The model runner's persistent batch: per running request its tokens, blocks and table row.

It changes only through ``apply(sched)``, from what the scheduler says changed (new requests,
new blocks, dropped requests), so a step sends deltas, not the whole state. Under async
scheduling a request's ``token_ids`` lags the device by ``num_pending`` tokens (sampled by
launched steps whose ids the host has not read yet).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from tessellm.core.block_table import PersistentBlockTable
from tessellm.core.step import SchedulerOutput


@dataclass
class RunnerRequest:
    request_id: str
    token_ids: list[int]  # prompt + output so far (accepted tokens only, never drafts)
    num_prompt_tokens: int
    params: object  # SamplingParams
    block_ids: list[int]
    num_computed_tokens: int  # tokens with K/V in the cache before the current step
    row: int = -1  # this request's row in the persistent block table
    prompt_logprobs: list = field(default_factory=list)  # accumulated over prefill chunks
    # prompt_logprob_token_ids' scores, one list per scored prompt row, accumulated likewise
    prompt_id_rows: list = field(default_factory=list)
    num_pending: int = 0  # tokens sampled by launched steps, not yet in token_ids
    spec_token_ids: list[int] = field(default_factory=list)  # drafts the current step verifies
    draft_probs: object = None  # float32 [k, vocab] tensor: the drafts' distribution; None: point masses
    proposed: list[int] = field(default_factory=list)  # the proposer's drafts after its last step
    mm_features: list = field(default_factory=list)  # its images (multimodal.inputs); [] for text
    # bool [vocab] on the sampler's device, True where ``params.allowed_token_ids`` bans the
    # token; built at this request's first sampled step, kept while it runs.
    disallowed: object = None
    pooling_task: Optional[str] = None  # a pooling request's task (NewRequestData.pooling_task)
    prompt_embeds: object = None  # PromptEmbeds (NewRequestData.prompt_embeds); None: token ids
    # The prompt was given as embeddings (its token ids are placeholders: penalties skip them);
    # stays True after ``prompt_embeds`` is dropped once the prompt is computed.
    embeds_prompt: bool = False
    # A thinking_token_budget's place (tessellm.reasoning.budget.ThinkingBudget): made at the
    # first sampled step, caught up with the accepted tokens each step after.
    thinking: object = None

    @property
    def num_tokens(self) -> int:
        """Tokens so far, pending ones included (``token_ids`` lags by ``num_pending``)."""
        return len(self.token_ids) + self.num_pending


class InputBatch:
    """Every request the runner holds, and the block table rows they own."""

    def __init__(self, max_blocks_per_request: int):
        self.requests: dict[str, RunnerRequest] = {}
        self.tables = PersistentBlockTable(max_blocks_per_request)
        # The requests with a feature the per-step builders look for row by row; while a set is
        # empty its builder skips the rows (a batch without it pays no Python per row for it).
        self.with_budget: set[str] = set()  # thinking_token_budget (sampling_metadata._forced)
        self.with_id_logprobs: set[str] = set()  # logprob_token_ids (sampling_metadata._add_logprobs)
        self.with_prompt_rows: set[str] = set()  # prompt logprobs or prefill scoring (build_inputs)

    def apply(self, sched: SchedulerOutput, samples_here: bool) -> None:
        """Take in what changed. ``samples_here``: this rank samples (the last pipeline stage);
        other stages learn the tokens from ``CachedRequestData.new_token_ids``."""
        for rid in sched.dropped_request_ids:
            state = self.requests.pop(rid, None)
            if state is not None:
                self.tables.remove(state.row)
                self.with_budget.discard(rid)
                self.with_id_logprobs.discard(rid)
                self.with_prompt_rows.discard(rid)
        for rid, num_blocks in sched.kept_blocks.items():  # before new blocks are appended
            state = self.requests.get(rid)
            if state is not None:
                self.truncate_blocks(state, min(num_blocks, len(state.block_ids)))
        for new in sched.new_requests:
            self.requests[new.request_id] = RunnerRequest(
                new.request_id, list(new.all_token_ids), len(new.prompt_token_ids),
                new.sampling_params, list(new.block_ids), new.num_computed_tokens,
                self.tables.add(new.block_ids), mm_features=list(new.mm_features),
                pooling_task=new.pooling_task, prompt_embeds=new.prompt_embeds,
                embeds_prompt=new.prompt_embeds is not None)
            self._note_features(new.request_id, new.sampling_params)
        for cached in sched.cached_requests:
            state = self.requests[cached.request_id]
            state.block_ids.extend(cached.new_block_ids)
            self.tables.append(state.row, cached.new_block_ids)
            # The scheduler's count is the truth (it knows which drafts were rejected).
            state.num_computed_tokens = cached.num_computed_tokens
            if cached.new_token_ids and not samples_here:  # tokens another stage sampled
                del state.token_ids[cached.num_computed_tokens:]
                state.token_ids.extend(cached.new_token_ids)
        for rid, drafts in sched.spec_token_ids.items():
            self.requests[rid].spec_token_ids = drafts

    def _note_features(self, rid: str, params) -> None:
        if params is None:  # a pooling request
            return
        if params.thinking_token_budget is not None:
            self.with_budget.add(rid)
        if params.logprob_token_ids:
            self.with_id_logprobs.add(rid)
        if params.needs_prompt_rows:
            self.with_prompt_rows.add(rid)

    def truncate_blocks(self, state: RunnerRequest, num_blocks: int) -> None:
        """Forget blocks past ``num_blocks`` (the scheduler freed them: rejected drafts,
        ``SchedulerOutput.kept_blocks``)."""
        del state.block_ids[num_blocks:]
        self.tables.num_blocks[state.row] = num_blocks
