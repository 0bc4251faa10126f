"""Chat rendering, shared by ``LLM.chat``, ``tessellm generate --chat`` and the server's
``/v1/chat/completions`` and ``/tokenize``: one function, so the same messages give the same
prompt token ids (and so the same greedy output) on every path."""

from __future__ import annotations

import functools
import re
from typing import Optional

# vLLM's chat_template_content_format: how a message's content reaches the template
#   "string": one string (a list of text parts joined by "\n")
#   "openai": a list of parts, [{"type": "text", "text": ...}, {"type": "image"}, ...] (a string
#             content becomes one text part)
#   "auto":   "openai" when the template loops over a message's content, else "string"
CONTENT_FORMATS = ("auto", "string", "openai")
_TEXT_PARTS = ("text", "input_text", "output_text", "refusal", "thinking")  # vLLM's TEXT_PART_TYPES
_MEDIA_PARTS = ("image", "video", "image_url", "image_pil", "video_url")


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
                documents: Optional[list[dict]] = None, content_format: str = "auto",
                encode=None) -> list[int]:
    """The conversation (``[{role, content}, ...]``) through the chat template, as token ids.

    ``chat_template`` (Jinja text) overrides the tokenizer's own; ValueError when neither exists.
    ``tools``: OpenAI-shaped tool definitions, for templates that show them to the model.
    ``continue_final_message``: the last message is left open (no end-of-turn) so the model
    continues it (vLLM's option, with ``add_generation_prompt`` false).
    ``template_kwargs``: extra variables for the template (e.g. ``enable_thinking``).
    ``add_special_tokens``: the tokenizer's own special tokens (BOS, ...) added on top of the
    rendered text, as vLLM's chat field of that name (off: the template places them).
    ``content_format``: vLLM's ``chat_template_content_format`` (``CONTENT_FORMATS``).
    ``encode``: ``encode(text, add_special_tokens) -> ids`` instead of the tokenizer's own (a
    truncating one: ``InputProcessor.encode_text``, so a cut keeps the BOS the tokenizer adds).
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
    fmt = resolve_content_format(content_format, tokenizer, chat_template, tools)
    conversation = [format_content(m, fmt) for m in conversation]
    text = tokenizer.apply_chat_template(conversation, tokenize=False, chat_template=chat_template,
                                         add_generation_prompt=add_generation_prompt, **extra)
    if encode is not None:
        return encode(text, add_special_tokens)
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def check_content_format(value) -> str:
    if value not in CONTENT_FORMATS:
        raise ValueError(f"chat_template_content_format must be one of {', '.join(CONTENT_FORMATS)}, "
                         f"got {value!r}.")
    return value


def resolve_content_format(given: str, tokenizer, chat_template: Optional[str] = None,
                           tools: Optional[list[dict]] = None) -> str:
    """``string`` or ``openai``: ``given`` unless ``auto``, then what the template reads
    (``detect_content_format``; ``string`` when there is no template to read)."""
    if check_content_format(given) != "auto":
        return given
    template = chat_template
    if template is None:
        try:  # a tokenizer may keep several named templates: the one apply_chat_template uses
            template = tokenizer.get_chat_template(None, tools=tools)
        except Exception:  # noqa: BLE001 - no template: render_chat names the problem
            return "string"
    return detect_content_format(template) if isinstance(template, str) else "string"


_GENERATION_TAG = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")


@functools.lru_cache(maxsize=32)
def detect_content_format(template: str) -> str:
    """vLLM's detection: ``openai`` when the Jinja template loops over a message's content
    (``{% for message in messages %}...{% for part in message['content'] %}``, through
    ``set`` aliases, slices and filters of either), else ``string``; a template that does not
    parse is ``string``."""
    import jinja2
    from jinja2 import nodes

    # transformers' {% generation %} ... {% endgeneration %} (assistant-mask) tag is not plain
    # Jinja and holds no loop over content: dropped before parsing
    plain = _GENERATION_TAG.sub("", template)
    try:
        ast = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(plain)
    except jinja2.TemplateError:
        return "string"

    def reads(node, names: set, key: Optional[str] = None) -> bool:
        """``node`` is one of ``names`` (``key``: its ``[key]`` / ``.key``), maybe filtered,
        tested or sliced."""
        if isinstance(node, (nodes.Filter, nodes.Test)):
            return node.node is not None and reads(node.node, names, key)
        if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice):
            return reads(node.node, names, key)
        if key is not None:
            if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and node.arg.value == key:
                return reads(node.node, names)
            if isinstance(node, nodes.Getattr) and node.attr == key:
                return reads(node.node, names)
            return False
        return isinstance(node, nodes.Name) and node.ctx == "load" and node.name in names

    messages = {"messages"}
    grown = True
    while grown:  # {% set loop_messages = messages[1:] %} and the like
        aliases = {a.target.name for a in ast.find_all(nodes.Assign)
                   if isinstance(a.target, nodes.Name) and reads(a.node, messages)}
        grown = not aliases <= messages
        messages |= aliases
    loops = list(ast.find_all(nodes.For))
    message = {f.target.name for f in loops if isinstance(f.target, nodes.Name) and reads(f.iter, messages)}
    if any(reads(f.iter, message, "content") for f in loops):
        return "openai"
    # A loop over a variable named ``content`` (Qwen3.5's ``{% for item in content %}`` in a
    # macro), or over a macro's parameter that a call passes a message's content to (MiMo's
    # ``render_content(message.content)``): vLLM's detection since its PRs #42660 / #53824.
    contents = {"content"}
    for call in ast.find_all(nodes.Call):
        if not isinstance(call.node, nodes.Name):
            continue
        for macro in ast.find_all(nodes.Macro):
            if macro.name != call.node.name:
                continue
            params = [a.name for a in macro.args]
            contents |= {params[i] for i, arg in enumerate(call.args)
                         if i < len(params) and reads(arg, message, "content")}
            contents |= {kw.key for kw in call.kwargs if kw.key in params and reads(kw.value, message, "content")}
    return "openai" if any(reads(f.iter, contents) for f in loops) else "string"


def format_content(message: dict, fmt: str) -> dict:
    """One message with its content as ``fmt`` (``string`` / ``openai``) says, as vLLM parses
    it: a string becomes one text part (openai), text parts are joined by newlines (string), no
    content is "" / []; a tool result's text (a string, parts or none) is a string in either. A
    message with image or video parts is left as it is: the multimodal path
    (tessellm/multimodal/chat.py) places its images in either form."""
    content = message.get("content")
    if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in _MEDIA_PARTS
                                         for p in content):
        return message
    if content is None:
        parts = []
    elif isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        parts = [_text_part(p) for p in content]
    else:
        return message  # not a chat content: the template sees it as given
    if fmt == "string" or message.get("role") == "tool":  # vLLM: a tool result's text is a string
        return {**message, "content": "\n".join(p["text"] for p in parts)}
    return {**message, "content": parts}


def _text_part(part) -> dict:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, dict) or part.get("type", "text") not in _TEXT_PARTS:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        raise ValueError(f"A content part of type {kind!r} is not supported; give text parts "
                         "({'type': 'text', 'text': ...}) or image_url / video_url parts.")
    key = {"refusal": "refusal", "thinking": "thinking"}.get(part.get("type"), "text")
    text = part.get(key, part.get("text"))
    if not isinstance(text, str):
        raise ValueError(f"A {part.get('type', 'text')} content part needs a string {key!r}.")
    return {**{k: v for k, v in part.items() if k not in ("refusal", "thinking")}, "type": "text", "text": text}
