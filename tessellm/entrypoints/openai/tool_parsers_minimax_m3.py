"""MiniMax-M3's tool calls (``minimax_m3``): every tag starts with the namespace marker
``]<]minimax[>[`` (``NS`` below); a ``<tool_call>`` block holds one or more ``<invoke>``
elements whose arguments are elements named after the parameters, nested for objects and
arrays::

    NS<tool_call>
    NS<invoke name="create_order">NS<user_id>42NS</user_id>
    NS<shipping>NS<city>SingaporeNS</city>NS<zip>018956NS</zip>NS</shipping>
    NS<items>NS<item>NS<sku>book-001NS</sku>NS</item>NS<item>NS<sku>pen-007NS</sku>NS</item>NS</items>
    NS</invoke>
    NS</tool_call>

An element with text only is a value, typed by its schema in the request's tools as
``qwen3_coder``'s (``zip``: integer 18956; no schema: the text). An element with child
elements is an array when its schema says so (the children's names do not matter, ``item``
above), else an object of its children, where a name that repeats collects its values in a
list. Elements nest at most ``MAX_DEPTH`` deep; anything else (text beside child elements, a
tag closed out of order) is not a call.

Contract as in ``tool_parsers_base.py``: the body is split once at the namespace marker and
read with a stack, so a parse is linear in the text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from tessellm.entrypoints.openai.tool_parsers_base import (ParsedToolCall, ParseResult, ToolParser, arguments_json,
                                                           schema_type, tagged_calls, typed_value)
from tessellm.reasoning.holdback import hold_back

NS = "]<]minimax[>["
MAX_DEPTH = 32  # nested elements per argument; deeper: not a call


@dataclass
class _Element:
    name: str
    children: list[_Element] = field(default_factory=list)
    text: list[str] = field(default_factory=list)


class MinimaxM3Parser(ToolParser):
    name = "minimax_m3"
    needs_special_tokens = True
    SECTION, SECTION_END = NS + "<tool_call>", NS + "</tool_call>"
    INVOKE, INVOKE_END = NS + "<invoke name=", NS + "</invoke>"

    def parse(self, text: str, final: bool) -> ParseResult:
        start = text.find(self.SECTION)
        if start < 0:
            return ParseResult(text if final else hold_back(text, self.SECTION))
        first = text.find(self.INVOKE, start + len(self.SECTION))
        if first < 0:
            return ParseResult(text if final else text[:start])
        return tagged_calls(text, start, first, final, (self.INVOKE, self.INVOKE_END), self._call,
                            (self.SECTION_END,))

    def _call(self, body: str, whole: bool, _at: int) -> Optional[ParsedToolCall]:
        gt = body.find(">")
        name = body[:gt].strip().strip("\"'") if gt >= 0 else ""
        if not whole:
            return ParsedToolCall(name or None, None)
        root = _elements(body[gt + 1:]) if name else None
        if root is None:
            return None
        schema = {"type": "object", "properties": self.parameter_schemas(name)}
        args = _value(root, schema) if root.children else {}
        return ParsedToolCall(name, arguments_json(args)) if isinstance(args, dict) else None


def _elements(body: str) -> Optional[_Element]:
    """The elements of an invoke's body under one root; None if they are not well formed."""
    pieces = body.split(NS)
    stack = [_Element("")]
    if pieces[0].strip():
        return None
    for piece in pieces[1:]:
        gt = piece.find(">")
        if not piece.startswith("<") or gt < 0:
            return None
        tag = piece[1:gt].strip()
        if tag.startswith("/"):
            if len(stack) == 1 or stack[-1].name != tag[1:].strip():
                return None
            done = stack.pop()
            stack[-1].children.append(done)
        elif not tag or len(stack) > MAX_DEPTH:
            return None
        else:
            stack.append(_Element(tag))
        stack[-1].text.append(piece[gt + 1:])
    return stack[0] if len(stack) == 1 and not "".join(stack[0].text).strip() else None


def _value(element: _Element, schema) -> Any:
    """An element's value under its schema (None where text lies beside child elements)."""
    text = "".join(element.text)
    if not element.children:
        return typed_value(text, schema)
    if text.strip():
        return None
    if schema_type(schema) == "array":
        items = schema.get("items") if isinstance(schema, dict) else None
        values = [_value(c, items) for c in element.children]
        return values if all(v is not None or not c.children for v, c in zip(values, element.children)) else None
    obj: dict[str, Any] = {}
    repeated: set[str] = set()
    for child in element.children:
        value = _value(child, _property(schema, child.name))
        if value is None and child.children:
            return None
        if child.name in repeated:
            obj[child.name].append(value)
        elif child.name in obj:
            obj[child.name] = [obj[child.name], value]
            repeated.add(child.name)
        else:
            obj[child.name] = value
    return obj


def _property(schema, key: str):
    """The schema of ``key`` in an object's schema (its ``properties``, else
    ``additionalProperties``); None if unknown."""
    if not isinstance(schema, dict):
        return None
    props = schema.get("properties")
    if isinstance(props, dict) and key in props:
        return props[key]
    extra = schema.get("additionalProperties")
    return extra if isinstance(extra, dict) else None


MINIMAX_M3_PARSERS = {"minimax_m3": MinimaxM3Parser}
