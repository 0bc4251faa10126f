"""Chat rendering, shared by ``LLM.chat``, ``tessellm generate --chat`` and the server's
``/v1/chat/completions`` and ``/tokenize``: one function, so the same messages give the same
prompt token ids (and so the same greedy output) on every path."""

from __future__ import annotations

from typing import Optional


# apply_chat_template's own arguments: never taken from a request's chat_template_kwargs
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "sanitize_control_tokens", "padding", "truncation",
    "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
    "tokenizer_kwargs"})


def render_chat(tokenizer, conversation: list[dict], add_generation_prompt: bool = True,
                chat_template: Optional[str] = None, tools: Optional[list[dict]] = None,
                continue_final_message: bool = False,
                template_kwargs: Optional[dict] = None, add_special_tokens: bool = False,
                documents: Optional[list[dict]] = None) -> list[int]:
    """The conversation (``[{role, content}, ...]``) through the chat template, as token ids.

    ``chat_template`` (Jinja text) overrides the tokenizer's own; ValueError when neither exists.
    ``tools``: OpenAI-shaped tool definitions, for templates that show them to the model.
    ``continue_final_message``: the last message is left open (no end-of-turn) so the model
    continues it (vLLM's option, with ``add_generation_prompt`` false).
    ``template_kwargs``: extra variables for the template (e.g. ``enable_thinking``).
    ``add_special_tokens``: the tokenizer's own special tokens (BOS, ...) added on top of the
    rendered text, as vLLM's chat field of that name (off: the template places them).
    """
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("The tokenizer has no chat template; pass chat_template=...")
    extra = dict(template_kwargs or {})
    bad = sorted(RESERVED_TEMPLATE_KWARGS & set(extra))
    if bad:
        raise ValueError(f"chat_template_kwargs may not set {', '.join(bad)}.")
    if tools:
        extra["tools"] = tools
    if documents:  # vLLM's: RAG documents for templates that show them (Command R, Granite, ...)
        extra["documents"] = documents
    if continue_final_message:
        extra["continue_final_message"] = True
    text = tokenizer.apply_chat_template(conversation, tokenize=False, chat_template=chat_template,
                                         add_generation_prompt=add_generation_prompt, **extra)
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)
