"""vLLM's ``tokenization_kwargs`` of ``LLM.generate`` / ``chat`` / ``encode`` / ``embed`` /
``classify`` / ``reward`` / ``score``: how the front end tokenizes and cuts a prompt.

The keys vLLM reads, and what each does here:

    truncate_prompt_tokens   keep the prompt's last k tokens (-1: as many as the context holds),
                             as ``SamplingParams`` / ``PoolingParams.truncate_prompt_tokens``
    truncation + max_length  HF's spelling of it: ``truncation=True`` keeps the last
                             ``max_length`` tokens; ``truncation=False`` cuts nothing
    add_special_tokens       a text prompt is encoded with (default) or without the tokenizer's
                             BOS etc.; token-id prompts are never changed. In ``chat``: the
                             tokenizer's special tokens on top of the template's text
    do_lower_case            a text prompt is lower-cased before it is encoded
    needs_detokenization     accepted, no effect (the prompt's text is kept when it is given)

vLLM warns about any other key and goes on; here it is a ValueError naming it, so a setting
never silently does nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

_KEYS = ("truncate_prompt_tokens", "truncation", "max_length", "add_special_tokens", "do_lower_case",
         "needs_detokenization")


@dataclass(frozen=True)
class TokenizationKwargs:
    truncate_prompt_tokens: Optional[int] = None  # None: the prompt whole
    add_special_tokens: Optional[bool] = None  # None: the tokenizer's default (True) for text
    do_lower_case: bool = False

    @classmethod
    def parse(cls, kwargs: Optional[dict], where: str) -> "TokenizationKwargs":
        """``where``: the method, for the error (``"generate"``)."""
        if kwargs is None:
            return cls()
        if not isinstance(kwargs, dict):
            raise ValueError(f"{where}(tokenization_kwargs=...) must be a dict, got {type(kwargs).__name__}.")
        unknown = sorted(set(kwargs) - set(_KEYS))
        if unknown:
            raise ValueError(f"{where}(tokenization_kwargs=...): {', '.join(map(repr, unknown))} not "
                             f"supported; the keys tessellm reads: {', '.join(_KEYS)}.")
        truncate = kwargs.get("truncate_prompt_tokens")
        truncation, max_length = kwargs.get("truncation"), kwargs.get("max_length")
        if truncation in (True, "longest_first"):
            if max_length is None:
                raise ValueError(f"{where}(tokenization_kwargs=...): truncation=True needs max_length "
                                 "(the prompt tokens to keep), or give truncate_prompt_tokens.")
            truncate = max_length
        elif truncation in (False, "do_not_truncate"):
            truncate = None
        elif truncation is not None:
            raise ValueError(f"{where}(tokenization_kwargs=...): truncation={truncation!r} is not "
                             "supported; use True (keep the last max_length tokens) or False.")
        elif max_length is not None:
            raise ValueError(f"{where}(tokenization_kwargs=...): max_length applies with truncation=True; "
                             "to keep a prompt's last k tokens give truncate_prompt_tokens=k.")
        add = kwargs.get("add_special_tokens")
        if add is not None and not isinstance(add, bool):
            raise ValueError(f"{where}(tokenization_kwargs=...): add_special_tokens must be true or false.")
        return cls(truncate, add, bool(kwargs.get("do_lower_case", False)))

    @property
    def changes_text_encoding(self) -> bool:
        return self.add_special_tokens is False or self.do_lower_case

    def tokenized(self, prompt, tokenizer, where: str):
        """``prompt`` with its text encoded as these kwargs say (a token-id prompt as given)."""
        if not self.changes_text_encoding:
            return prompt
        text = prompt if isinstance(prompt, str) else (prompt.get("prompt") if isinstance(prompt, dict) else None)
        if text is None or (isinstance(prompt, dict) and "prompt_token_ids" in prompt):
            return prompt  # token ids (or embeddings) are the prompt as given
        if isinstance(prompt, dict) and "multi_modal_data" in prompt:
            raise ValueError(f"{where}(tokenization_kwargs=...): add_special_tokens / do_lower_case do not "
                             "apply to a prompt with images (its processor encodes it); leave them out.")
        if tokenizer is None:
            raise ValueError("This model has no tokenizer files; pass prompts as token ids "
                             "({'prompt_token_ids': [...]}).")
        encoded = text.lower() if self.do_lower_case else text
        ids = tokenizer.encode(encoded, add_special_tokens=self.add_special_tokens is not False)
        rest = prompt if isinstance(prompt, dict) else {}
        return {**rest, "prompt": text, "prompt_token_ids": ids}
