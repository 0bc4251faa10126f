"""Incremental detokenization with stop strings.

Decoding token by token is wrong for byte-level and sentencepiece tokenizers (a character can
span tokens; a leading space depends on the previous token), and decoding the whole output each
step is quadratic. We keep two offsets into the ids and decode only a short window::

    ids:   ... p p p | o o o o o | n
                     ^prefix     ^read
    text of ids[prefix:] minus text of ids[prefix:read] is the new text, once it no longer ends
    in an incomplete character (U+FFFD).

The window starts with a few prompt tokens so the first output token gets its leading space.

Stop strings are looked for after each token, also when a step brings several (speculative
decoding accepts drafts): the output ends with the token that completes the stop string, as
without speculation, and ``num_kept`` says how many of the step's tokens that is. As in vLLM,
no stop string ends the output before ``min_tokens`` tokens.
"""

from __future__ import annotations

from typing import Optional

_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 stop: Optional[list[str]] = None, include_stop_str_in_output: bool = False,
                 min_tokens: int = 0):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.stop = stop or []
        self.include_stop = include_stop_str_in_output
        # While streaming, hold back what could still turn out to start a stop string.
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.stop_reason: Optional[str] = None
        self.min_tokens = min_tokens
        self.num_output_tokens = 0
        self.num_kept = 0  # of the last add_tokens call's tokens: those up to the stop string

    def add_tokens(self, new_ids: list[int], finished: bool = False) -> Optional[str]:
        """Append tokens; returns the stop string if one now appears in the text, else None.
        After a hit, ``num_kept`` of ``new_ids`` are the output's (the rest are past the stop)."""
        if not self.stop or len(new_ids) <= 1:
            self.num_kept = len(new_ids)
            return self._add(new_ids, finished)
        for i, token in enumerate(new_ids):
            hit = self._add([token], finished and i == len(new_ids) - 1)
            if hit is not None:
                self.num_kept = i + 1
                return hit
        self.num_kept = len(new_ids)
        return None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def _add(self, new_ids: list[int], finished: bool) -> Optional[str]:
        self.ids.extend(new_ids)
        self.num_output_tokens += len(new_ids)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and (finished or not full.endswith("\ufffd")):
            delta = full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text += delta
            if self.num_output_tokens <= self.min_tokens:
                return None
            return self._check_stop(len(delta))
        return None

    def _check_stop(self, delta_len: int) -> Optional[str]:
        for stop in self.stop:
            start = max(0, len(self.text) - delta_len - len(stop) + 1)
            idx = self.text.find(stop, start)
            if idx != -1:
                self.text = self.text[:idx + len(stop)] if self.include_stop else self.text[:idx]
                self.stop_reason = stop
                return stop
        return None

    def visible_text(self, finished: bool) -> str:
        """The text safe to show: everything once finished, else minus the hold-back."""
        if finished or not self.stop or self.holdback == 0:
            return self.text
        return self.text[:max(0, len(self.text) - self.holdback)]
