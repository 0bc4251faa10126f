"""vLLM's ``tokenization_kwargs`` of ``LLM.generate`` / ``chat`` / ``encode`` / ``embed`` /
``classify`` / ``reward`` / ``score``: how the front end tokenizes and cuts a prompt.

The keys vLLM reads, and what each does here:

    truncate_prompt_tokens   keep k of the prompt's tokens (-1: as many as the context holds),
                             as ``SamplingParams`` / ``PoolingParams.truncate_prompt_tokens``:
                             the last k on a generating engine, the first k on a pooling one
    truncation + max_length  HF's spelling of it: ``truncation=True`` keeps ``max_length``
                             tokens (without max_length: as many as the context holds,
                             vLLM's); ``truncation=False`` cuts nothing
    add_special_tokens       a text prompt is encoded with (default) or without the tokenizer's
                             BOS etc.; token-id prompts are never changed. In ``chat``: the
                             tokenizer's special tokens on top of the template's text
    do_lower_case            a text prompt is lower-cased before it is encoded
    needs_detokenization     accepted, no effect (the prompt's text is kept when it is given)

vLLM warns about any other key and goes on; here it is a ValueError naming it, so a setting
never silently does nothing. Where vLLM's answer depends on the spelling or silently drops one
of two settings, the combination is refused naming both (``_merged_truncation``).

The cut is vLLM's: its generate runner loads the tokenizer with ``truncation_side="left"`` (the
*last* tokens stay), its pooling runner with ``"right"`` (the *first* ones); a text prompt is cut
by the tokenizer, its special tokens kept (``tessellm/core/prompt_truncation.py``).
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
        truncate = _merged_truncation(kwargs, where)
        add = kwargs.get("add_special_tokens")
        if add is not None and not isinstance(add, bool):
            raise ValueError(f"{where}(tokenization_kwargs=...): add_special_tokens must be true or false.")
        return cls(truncate, add, bool(kwargs.get("do_lower_case", False)))

    @property
    def changes_text_encoding(self) -> bool:
        return self.add_special_tokens is False or self.do_lower_case

    def tokenized(self, prompt, engine, where: str):
        """``prompt`` with its text encoded as these kwargs say (a token-id prompt as given), cut
        as the engine cuts text (``InputProcessor.encode_text``: the special tokens stay)."""
        tokenizer = engine.tokenizer
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
        ids = engine.inputs.encode_text(encoded, self.truncate_prompt_tokens, self.add_special_tokens is not False)
        rest = prompt if isinstance(prompt, dict) else {}
        return {**rest, "prompt": text, "prompt_token_ids": ids}


def _merged_truncation(kwargs: dict, where: str) -> Optional[int]:
    """``truncate_prompt_tokens`` with HF's ``truncation`` / ``max_length`` folded in.

    vLLM (``TokenizeParams.with_kwargs``): ``truncation=True`` takes ``max_length`` (default:
    the context) over any ``truncate_prompt_tokens`` of the same call; ``truncation=False``
    keeps ``truncate_prompt_tokens`` but ``"do_not_truncate"`` drops it; ``max_length`` without
    ``truncation=True`` is a prompt-length limit. Here: the two spellings must agree or the call
    is refused naming both; ``max_length`` is only read with ``truncation=True``."""
    truncate = kwargs.get("truncate_prompt_tokens")
    truncation, max_length = kwargs.get("truncation"), kwargs.get("max_length")
    prefix = f"{where}(tokenization_kwargs=...)"
    if truncation is None:
        if max_length is not None:
            raise ValueError(f"{prefix}: max_length applies with truncation=True; to keep k of a prompt's "
                             "tokens give truncate_prompt_tokens=k (or truncation=True, max_length=k).")
        return truncate
    if truncation in (False, "do_not_truncate"):
        if truncate is not None or max_length is not None:
            given = "truncate_prompt_tokens" if truncate is not None else "max_length"
            raise ValueError(f"{prefix}: truncation={truncation!r} (cut nothing) and {given}={kwargs[given]!r} "
                             "contradict each other; give one of them.")
        return None
    if truncation not in (True, "longest_first"):
        raise ValueError(f"{prefix}: truncation={truncation!r} is not supported; use True (keep "
                         "max_length tokens) or False.")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                   or max_length < 1):
        raise ValueError(f"{prefix}: max_length must be an integer >= 1 (the prompt tokens to keep), "
                         f"got {max_length!r}.")
    cut = -1 if max_length is None else max_length  # vLLM: max_length defaults to the context
    if truncate is not None and truncate != cut:
        keeps = "as many as the context holds" if max_length is None else f"max_length={max_length!r}"
        raise ValueError(f"{prefix}: truncate_prompt_tokens={truncate!r} and truncation=True ({keeps}) "
                         "ask for different cuts; give one of them.")
    return cut
