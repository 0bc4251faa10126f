"""Chat rendering, shared by ``LLM.chat``, ``tessellm generate --chat`` and the server's
``/v1/chat/completions`` and ``/tokenize``: one function, so the same messages give the same
prompt token ids (and so the same greedy output) on every path."""

from __future__ import annotations

from typing import Optional


def render_chat(tokenizer, conversation: list[dict], add_generation_prompt: bool = True,
                chat_template: Optional[str] = None, tools: Optional[list[dict]] = None) -> list[int]:
    """The conversation (``[{role, content}, ...]``) through the chat template, as token ids.

    ``chat_template`` (Jinja text) overrides the tokenizer's own; ValueError when neither exists.
    ``tools``: OpenAI-shaped tool definitions, for templates that show them to the model.
    """
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("The tokenizer has no chat template; pass chat_template=...")
    extra = {"tools": tools} if tools else {}
    text = tokenizer.apply_chat_template(conversation, tokenize=False, chat_template=chat_template,
                                         add_generation_prompt=add_generation_prompt, **extra)
    return tokenizer.encode(text, add_special_tokens=False)
