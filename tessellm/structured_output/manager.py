"""The engine core's side of structured output: grammars per request, the step's bitmask.

Per step (``EngineCore.step``), after the scheduler decided::

    SchedulerOutput.num_scheduled_tokens   {"a": 1, "b": 37, "c": 1}      (b: a prefill chunk)
    constrained requests that sample now    a, c
    grammar_bitmask  int32 [2, ceil(V/32)]  row 0: a's allowed tokens, row 1: c's
    grammar_bitmask_rows                    {"a": 0, "c": 1}

Bit ``t % 32`` of word ``t // 32`` of a row is 1 when token ``t`` is allowed. The model runner
expands this to its sampling rows (an unconstrained row allows everything) and applies it to the
logits with the backend's ``apply_token_bitmask`` before sampling.

Invariant: a constrained request's matcher has accepted exactly its output tokens when the step
is scheduled. The scheduler guarantees it by never scheduling a constrained request ahead of a
step in flight (async scheduling, pipeline stages), and ``Scheduler.update`` advances the
matcher as it appends each sampled token. Preemption keeps the output tokens (the request is
recomputed from them), so the matcher state stays valid and nothing is replayed.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from typing import Callable, Optional

from tessellm.structured_output.compiler import GrammarCompilerPool, RequestGrammar
from tessellm.structured_output.params import StructuredOutputsParams

logger = logging.getLogger(__name__)


class StructuredOutputManager:
    def __init__(self, load_tokenizer: Callable[[], object], vocab_size: int, stop_token_ids: list[int]):
        """``load_tokenizer`` is called on the first constrained request (never otherwise); it
        returns the model's HF tokenizer, an ``xgrammar.TokenizerInfo``, or None (no tokenizer:
        constrained requests are refused)."""
        self._load_tokenizer = load_tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self._pool: Optional[GrammarCompilerPool] = None
        self._batch = None  # xgrammar's BatchGrammarMatcher, made on first use
        self.fill_threads = min(8, os.cpu_count() or 1)  # threads filling a step's mask rows

    @property
    def pool(self) -> GrammarCompilerPool:
        if self._pool is None:
            tokenizer = self._load_tokenizer()
            if tokenizer is None:
                raise ValueError("This model has no tokenizer, so structured output is unavailable.")
            self._pool = GrammarCompilerPool(tokenizer, self.vocab_size, self.stop_token_ids)
        return self._pool

    def grammar_for(self, params: StructuredOutputsParams) -> RequestGrammar:
        """Start (or share) the compile for a new request; returns its matcher-to-be."""
        return RequestGrammar(self.pool.submit(params))

    def fill_bitmask(self, sched, requests: dict) -> None:
        """Set ``sched.grammar_bitmask`` / ``sched.grammar_bitmask_rows`` for the constrained
        requests that sample in this step (none: they stay None / empty)."""
        rows = []
        for rid, num_sampled in sched.num_sampled_tokens.items():
            grammar = getattr(requests.get(rid), "grammar", None)
            if num_sampled and grammar is not None and grammar.matcher is not None:
                rows.append((rid, grammar))
        if not rows:
            return
        import xgrammar as xgr

        if any(rid in sched.spec_token_ids for rid, _ in rows):  # k + 1 rows for k drafts
            self._fill_with_drafts(sched, rows, xgr)
            return

        bitmask = xgr.allocate_token_bitmask(len(rows), self.vocab_size)
        if len(rows) == 1:
            rows[0][1].fill_bitmask(bitmask, 0)
        else:  # xgrammar fills the rows in parallel threads
            if self._batch is None:
                self._batch = xgr.BatchGrammarMatcher(max_threads=self.fill_threads)
            self._batch.batch_fill_next_token_bitmask([g.matcher for _, g in rows], bitmask)
        sched.grammar_bitmask = bitmask.numpy()
        sched.grammar_bitmask_rows = {rid: i for i, (rid, _) in enumerate(rows)}

    def _fill_with_drafts(self, sched, rows, xgr) -> None:
        """Speculative decoding: a row per sampled position (tessellm.spec_decode.grammar)."""
        from tessellm.spec_decode.grammar import fill_draft_rows

        bitmask = xgr.allocate_token_bitmask(sum(sched.num_sampled_tokens[rid] for rid, _ in rows),
                                             self.vocab_size)
        first, row = {}, 0
        for rid, grammar in rows:
            first[rid] = row
            fill_draft_rows(grammar, sched.spec_token_ids.get(rid, []), bitmask, row)
            row += sched.num_sampled_tokens[rid]
        sched.grammar_bitmask = bitmask.numpy()
        sched.grammar_bitmask_rows = first

    def wait_for_compiles(self, waiting, timeout_s: float = 0.005) -> None:
        """When nothing could be scheduled: wait briefly for a waiting request's compile rather
        than spin the engine loop (no-op when no request waits for its grammar)."""
        futures = [r.grammar.future for r in waiting
                   if getattr(r, "grammar", None) is not None and not r.grammar.future.done()]
        if futures:
            concurrent.futures.wait(futures, timeout=timeout_s, return_when=concurrent.futures.FIRST_COMPLETED)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
