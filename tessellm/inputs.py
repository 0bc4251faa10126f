"""vLLM's prompt types (``vllm.inputs``), for code written against it:
``from tessellm.inputs import TextPrompt, TokensPrompt``. They are plain dicts (TypedDicts), the
shapes ``LLM.generate`` / ``encode`` and ``LLMEngine.add_request`` take; a prompt may also be a
str (text) or a list of token ids."""

from __future__ import annotations

from typing import Any, TypedDict, Union


class _Optional(TypedDict, total=False):
    """The keys any prompt dict may add."""

    multi_modal_data: dict[str, Any]  # {"image": a PIL image or a list of them} (docs/multimodal.md)
    cache_salt: str  # prefix-cache blocks are shared only within one salt


class _Text(TypedDict):
    prompt: str


class _Tokens(TypedDict):
    prompt_token_ids: list[int]


class _TokensText(TypedDict, total=False):
    prompt: str  # the text the ids came from, shown as the output's prompt


class _Embeds(TypedDict):
    prompt_embeds: Any  # a torch.Tensor [tokens, hidden]


class TextPrompt(_Text, _Optional):
    """A text prompt: tokenized by the model's tokenizer."""


class TokensPrompt(_Tokens, _TokensText, _Optional):
    """A prompt given as token ids."""


class EmbedsPrompt(_Embeds, _Optional):
    """A prompt given as embeddings (``LLM(enable_prompt_embeds=True)``)."""


SingletonPrompt = Union[str, TextPrompt, TokensPrompt, EmbedsPrompt]
PromptType = SingletonPrompt  # vLLM's also takes encoder-decoder pairs; tessellm runs decoder-only models

__all__ = ["TextPrompt", "TokensPrompt", "EmbedsPrompt", "SingletonPrompt", "PromptType"]
