"""Incremental detokenization with stop strings.

Decoding token by token is wrong for byte-level and sentencepiece tokenizers (a character can
span tokens; a leading space depends on the previous token), and decoding the whole output each
step is quadratic. We keep two offsets into the ids and decode only a short window::

    ids:   ... p p p | o o o o o | n
                     ^prefix     ^read
    text of ids[prefix:] minus text of ids[prefix:read] is the new text, once it no longer ends
    in an incomplete character (U+FFFD).

The window starts with a few prompt tokens so the first output token gets its leading space.
"""

from __future__ import annotations

from typing import Optional

_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 stop: Optional[list[str]] = None, include_stop_str_in_output: bool = False):
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

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def add_tokens(self, new_ids: list[int], finished: bool = False) -> Optional[str]:
        """Append tokens; returns the stop string if one now appears in the text, else None."""
        self.ids.extend(new_ids)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and (finished or not full.endswith("\ufffd")):
            delta = full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text += delta
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
