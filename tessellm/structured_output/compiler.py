"""Grammar compilation off the step loop: a thread pool, cached by a hash of the spec.

Compiling a grammar against the vocabulary (xgrammar's token-mask cache) takes from under a
millisecond (a small schema) to seconds (a large one). The engine loop never waits for it: a
request's compile is submitted when the request arrives, and the scheduler leaves the request
waiting until its future is done (``RequestGrammar.ready``) while others keep running.

Equal constraints (same ``StructuredOutputsParams.cache_key``) share one compile; the cache
keeps the ``max_cached`` most recently used compiled grammars. A compile that fails stays in the
cache as a failed future, so resubmitting the same bad spec fails at once.
"""

from __future__ import annotations

import collections
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable, Optional

from tessellm.structured_output.grammar import build_grammar, one_line
from tessellm.structured_output.params import StructuredOutputsParams


class GrammarCompilerPool:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Iterable[int],
                 max_workers: int = 2, max_cached: int = 256):
        """``tokenizer``: the model's HF tokenizer (or a ready ``xgrammar.TokenizerInfo``);
        ``vocab_size``: the model's logits width (may exceed the tokenizer's: the extra ids are
        always masked off)."""
        import xgrammar as xgr

        if isinstance(tokenizer, xgr.TokenizerInfo):
            self.tokenizer_info = tokenizer
        else:
            self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(
                tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids) or None)
        self.vocab_size = vocab_size
        # xgrammar's own cache is off: ours is keyed by the spec and holds futures.
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=1, cache_enabled=False)
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grammar")
        self._cache: collections.OrderedDict[str, Future] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.max_cached = max_cached
        self.num_compiles = 0  # compiles started (cache misses)

    def submit(self, params: StructuredOutputsParams) -> Future:
        """The (shared) future of the compiled grammar for ``params``."""
        key = params.cache_key()
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = self._pool.submit(self._compile, params)
            self.num_compiles += 1
            self._cache[key] = future
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return future

    def _compile(self, params: StructuredOutputsParams):
        return self._compiler.compile_grammar(build_grammar(params))

    def shutdown(self, cancel: bool = True) -> None:
        """Stop the compile threads; ``cancel=False`` lets the compiles already submitted finish
        (a pool replaced while requests still wait for its grammars)."""
        self._pool.shutdown(wait=False, cancel_futures=cancel)


def same_vocabulary(old, new) -> bool:
    """Whether two tokenizers (HF tokenizers, or ``xgrammar.TokenizerInfo``) map the same
    strings to the same ids: a grammar compiled against one is valid for the other."""
    if old is new:
        return True
    if hasattr(old, "get_vocab") and hasattr(new, "get_vocab"):
        return old.get_vocab() == new.get_vocab()
    return False


def compile_error(exc: BaseException) -> str:
    """The refusal of a request whose grammar failed in the engine (past the front end's
    checks): one sentence naming the problem, for the client's 400."""
    line = one_line(exc)
    if line.startswith("structured_outputs"):  # build_grammar's own refusal
        return line
    return f"structured_outputs could not be compiled against the vocabulary: {line}"


class RequestGrammar:
    """One request's matcher: advances with each accepted token, rolls back on demand.

    Created with the compile's future; ``matcher`` exists once the compile is done. The state
    lives in the engine core with the request, so a preempted request (recomputed later from
    its tokens) resumes exactly where its grammar was.
    """

    def __init__(self, future: Future):
        self.future = future
        self.matcher = None
        self.error: Optional[str] = None  # the compile failed: one sentence, the request's refusal

    @property
    def ready(self) -> bool:
        """True once the compile finished (or failed: ``error`` is then set)."""
        if self.matcher is not None or self.error is not None:
            return True
        if not self.future.done():
            return False
        exc = self.future.exception()
        if exc is None:
            import xgrammar as xgr

            try:
                self.matcher = xgr.GrammarMatcher(self.future.result())  # rollback: unlimited
                return True
            except Exception as matcher_exc:  # noqa: BLE001 - xgrammar's errors are RuntimeErrors
                exc = matcher_exc
        self.error = compile_error(exc)
        return True

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False if the grammar does not allow it."""
        return self.matcher.accept_token(token_id)

    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens (speculative rejection)."""
        if num_tokens:
            self.matcher.rollback(num_tokens)

    @property
    def is_terminated(self) -> bool:
        return self.matcher is not None and self.matcher.is_terminated()

    def fill_bitmask(self, bitmask, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (int32, bit t%32 of word t//32)."""
        self.matcher.fill_next_token_bitmask(bitmask, row)
