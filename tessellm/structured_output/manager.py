"""The engine core's side of structured output: grammars per request, the step's bitmask.

Per step (``EngineCore.step``), after the scheduler decided::

    SchedulerOutput.num_scheduled_tokens   {"a": 1, "b": 37, "c": 4}      (b: a prefill chunk;
    SchedulerOutput.spec_token_ids         {"c": [d0, d1, d2]}             c verifies 3 drafts)
    constrained requests that sample now    a (1 row), c (4 rows)
    grammar_bitmask  int32 [5, ceil(V/32)]  row 0: a's allowed tokens; rows 1..4: c's after its
                                            accepted tokens, then after d0, d0 d1, d0 d1 d2
    grammar_bitmask_rows                    {"a": 0, "c": 1}                (first row each)

Bit ``t % 32`` of word ``t // 32`` of a row is 1 when token ``t`` is allowed. The model runner
expands this to its sampling rows (an unconstrained row allows everything) and applies it to the
logits with the backend's ``apply_token_bitmask`` before sampling. A request's draft rows are
filled by advancing its matcher over the drafts and rolling it back afterwards
(``tessellm.spec_decode.grammar.fill_draft_rows``).

Invariant: when a constrained request's mask is filled, its matcher has accepted exactly its
output tokens. ``Scheduler.update`` advances the matcher as it appends each sampled token.
Under async scheduling a constrained request is scheduled one step ahead like any other; its
mask for step N+1 then needs step N's tokens, so the step is launched with
``grammar_deferred``: the runner runs the forward pass and waits for the mask before sampling,
and the engine core fills the mask (``fill_bitmask``) right after ``update`` accepted step N's
tokens, while the device runs step N+1's forward pass (vLLM v1 defers the same way). Preemption
keeps the output tokens (the request is recomputed from them), so the matcher state stays valid
and nothing is replayed.

Masks are filled into two preallocated buffers used in turn (a fresh 4 MB array per step costs
more than the fill), rows in parallel with xgrammar's ``BatchGrammarMatcher``. With the model
runner in this process on a GPU, those buffers are its pinned upload buffers
(``host_buffer``, from ``MaskUpload.host_buffer``): the mask is filled where the device copies
it from. A deferred step's mask is filled in the background (``fill_bitmask(background=True)``:
xgrammar releases the GIL), while the engine loop hands out the step's outputs and schedules the
next step; the engine core waits for it just before it launches anything after that step.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
from typing import Callable, Optional

from tessellm.reasoning.parsers import ThinkMarkers
from tessellm.spec_decode.grammar import fill_draft_rows
from tessellm.structured_output.compiler import GrammarCompilerPool, RequestGrammar, same_vocabulary
from tessellm.structured_output.params import StructuredOutputsParams
from tessellm.structured_output.reasoning import PluginGate, ReasoningGate

logger = logging.getLogger(__name__)


class StructuredOutputManager:
    def __init__(self, load_tokenizer: Callable[[], object], vocab_size: int, stop_token_ids: list[int],
                 reasoning_parser: Optional[str] = None, reasoning_parser_plugin: Optional[str] = None):
        """``load_tokenizer`` is called on the first constrained request (never otherwise); it
        returns the model's HF tokenizer, an ``xgrammar.TokenizerInfo``, or None (no tokenizer:
        constrained requests are refused). ``reasoning_parser``: grammars start after the
        model's reasoning (``reasoning.py``), found by name among the built-in parsers and those the
        ``reasoning_parser_plugin`` file registers."""
        self._load_tokenizer = load_tokenizer
        self._tokenizer = None
        self.reasoning_parser = reasoning_parser
        self.reasoning_parser_plugin = reasoning_parser_plugin
        self._markers = None  # ThinkMarkers, bound on first use
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self._pool: Optional[GrammarCompilerPool] = None
        self._batch = None  # xgrammar's BatchGrammarMatcher, made on first use
        self.fill_threads = min(8, os.cpu_count() or 1)  # threads filling a step's mask rows
        self._buffers: list = [None, None]  # the step masks, used in turn (``_buffer``)
        self._turn = 0
        # (num_rows, width) -> int32 rows to fill, when the runner lends its pinned buffers.
        self.host_buffer: Optional[Callable[[int, int], object]] = None
        self._filler: Optional[concurrent.futures.ThreadPoolExecutor] = None  # background fills
        self.background_fill = True  # deferred masks fill in the background (EngineCore.step)
        self.num_background_fills = 0
        self.num_deferred_steps = 0  # steps whose mask was filled after the step before came back

    @property
    def pool(self) -> GrammarCompilerPool:
        if self._pool is None:
            tokenizer = self._load_tokenizer()
            if tokenizer is None:
                raise ValueError("This model has no tokenizer, so structured output is unavailable.")
            self._tokenizer = tokenizer
            self._pool = GrammarCompilerPool(tokenizer, self.vocab_size, self.stop_token_ids)
        return self._pool

    def set_tokenizer(self, tokenizer) -> None:
        """Grammars of requests added from now on are compiled against ``tokenizer``
        (``LLM.set_tokenizer``; an HF tokenizer or an ``xgrammar.TokenizerInfo``). With another
        vocabulary the compile cache starts anew: requests already added keep the grammars
        compiled (or being compiled) against the old one, which their token ids follow."""
        self._load_tokenizer = lambda: tokenizer
        self._markers = None  # the think markers' ids, found again with this tokenizer
        if self._pool is not None and not same_vocabulary(self._tokenizer, tokenizer):
            self._pool.shutdown(cancel=False)
            self._pool = None  # the next constrained request builds one on ``tokenizer``
        self._tokenizer = tokenizer

    def grammar_for(self, params: StructuredOutputsParams, prompt_token_ids=(), reasoning_phase=None):
        """Start (or share) the compile for a new request; returns its matcher-to-be (behind a
        ``ReasoningGate`` with a reasoning parser: ``reasoning_phase``, the server's reading of
        the prompt and the request's switch, says where the output starts; None: the prompt)."""
        grammar = RequestGrammar(self.pool.submit(params))
        if self.reasoning_parser is None:
            return grammar
        markers = self._reasoning_markers()
        if not isinstance(markers, ThinkMarkers):  # a plugin's parser: its is_reasoning_end decides
            return PluginGate(grammar, markers.instance(self._tokenizer), prompt_token_ids)
        phase = reasoning_phase or markers.initial_phase(self._tokenizer, prompt_token_ids)
        return ReasoningGate(grammar, markers.start_ids, markers.end_ids, phase, markers.other_end_ids)

    def _reasoning_markers(self):
        """The parser's ``ThinkMarkers``, or a plugin's ``PluginParser`` (no markers known)."""
        if self._markers is None:
            from tessellm.reasoning.parsers import get_reasoning_parser
            from tessellm.reasoning.plugins import PluginParser

            if not hasattr(self._tokenizer, "encode"):
                raise ValueError("A reasoning parser needs the model's tokenizer to find its think markers.")
            parser = get_reasoning_parser(self.reasoning_parser, self.reasoning_parser_plugin)
            if isinstance(parser, PluginParser):
                parser = parser.house(self._tokenizer) or parser
            self._markers = (parser if isinstance(parser, PluginParser)
                             else ThinkMarkers.from_tokenizer(parser, self._tokenizer))
        return self._markers

    def fill_bitmask(self, sched, requests: dict, background: bool = False) -> Optional[concurrent.futures.Future]:
        """Set ``sched.grammar_bitmask`` / ``sched.grammar_bitmask_rows`` for the constrained
        requests that sample in this step: one row per sampled row (k+1 for k drafts). None
        constrained: they stay None / empty. A request no longer in ``requests`` (it ended
        while this step was deferred) gets no rows: its result is dropped anyway.
        ``background``: the rows of requests without drafts are filled in a thread; the mask
        is complete once the returned future is done (None: complete now)."""
        plain, plain_rows, drafted, num_rows = [], [], [], 0
        rows: dict[str, int] = {}
        for rid, num_sampled in sched.num_sampled_tokens.items():
            grammar = getattr(requests.get(rid), "grammar", None)
            if not num_sampled or grammar is None or grammar.matcher is None:
                continue
            gated = isinstance(grammar, ReasoningGate)
            if gated and num_sampled == 1 and not grammar.constrains_next:
                continue  # thinking: no mask row
            rows[rid] = num_rows
            if num_sampled > 1 or grammar.is_terminated or (gated and grammar.answer_from is None):
                drafted.append((grammar, num_rows, list(sched.spec_token_ids.get(rid, ()))[:num_sampled - 1]))
            else:
                plain.append(grammar.matcher)
                plain_rows.append(num_rows)
            num_rows += num_sampled
        if not rows:
            return None
        bitmask = self._buffer(num_rows)
        for grammar, first, drafts in drafted:
            if grammar.is_terminated:  # it ended while this step was deferred: never used
                bitmask[first:first + len(drafts) + 1] = -1
            else:
                fill_draft_rows(grammar, drafts, bitmask, first)
        sched.grammar_bitmask = bitmask.numpy()
        sched.grammar_bitmask_rows = rows
        if background and len(plain) > 1:
            if self._filler is None:
                self._filler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
            self.num_background_fills += 1
            return self._fill_in_background(plain, plain_rows, bitmask)
        self._fill_plain(plain, plain_rows, bitmask)
        return None

    def _fill_in_background(self, matchers: list, rows: list[int], bitmask) -> concurrent.futures.Future:
        """Start the fill in the filler thread and return once it runs: handed the GIL now, it
        gives it back inside xgrammar; left to wait, it could sit out a whole GIL switch
        interval (5 ms) behind the engine loop's Python before it even started."""
        started = threading.Event()

        def fill() -> None:
            started.set()
            self._fill_plain(matchers, rows, bitmask)

        future = self._filler.submit(fill)
        started.wait()
        return future

    def _fill_plain(self, matchers: list, rows: list[int], bitmask) -> None:
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(bitmask, rows[0])
        elif matchers:  # xgrammar fills the rows in parallel threads (without the GIL)
            if self._batch is None:
                import xgrammar as xgr

                self._batch = xgr.BatchGrammarMatcher(max_threads=self.fill_threads)
            self._batch.batch_fill_next_token_bitmask(matchers, bitmask, rows)

    def _buffer(self, num_rows: int):
        """``num_rows`` rows to fill: the runner's pinned buffer when it lends one, else one of
        two buffers of our own, in turn (the other may still be read by the step before).
        Grown, never shrunk."""
        import torch

        width = -(-self.vocab_size // 32)
        if self.host_buffer is not None:
            return self.host_buffer(num_rows, width)
        self._turn ^= 1
        buf = self._buffers[self._turn]
        if buf is None or buf.shape[0] < num_rows:
            buf = torch.empty((max(num_rows, 64), width), dtype=torch.int32)
            self._buffers[self._turn] = buf
        return buf[:num_rows]

    def must_defer(self, sched, in_flight, requests: dict) -> bool:
        """Whether ``sched`` (scheduled, in flight) samples a constrained request that an older
        step in flight also samples: its mask needs that step's tokens,
        so it is filled after that step's ``update`` (``grammar_deferred``)."""
        older = []
        for step in in_flight.steps:  # oldest first, up to ``sched``
            if step.sched is sched:
                break
            older.append(step.sched.num_sampled_tokens)
        if not older:
            return False
        deferred = any(getattr(requests.get(rid), "grammar", None) is not None
                       and any(rid in o for o in older) for rid in sched.num_sampled_tokens)
        self.num_deferred_steps += deferred
        return deferred

    def wait_for_compiles(self, waiting, timeout_s: float = 0.005) -> None:
        """When nothing could be scheduled: wait briefly for a waiting request's compile rather
        than spin the engine loop (no-op when no request waits for its grammar)."""
        futures = [r.grammar.future for r in waiting
                   if getattr(r, "grammar", None) is not None and not r.grammar.future.done()]
        if futures:
            concurrent.futures.wait(futures, timeout=timeout_s, return_when=concurrent.futures.FIRST_COMPLETED)

    def shutdown(self) -> None:
        if self._filler is not None:
            self._filler.shutdown(wait=True)
        if self._pool is not None:
            self._pool.shutdown()

