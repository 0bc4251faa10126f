"""From a ``StructuredOutputsParams`` to an xgrammar ``Grammar``, with the limits checked first.

``build_grammar`` is the one place a constraint becomes a grammar: the front end calls it to
refuse a malformed schema or grammar with a clear error before anything is queued (cheap: no
tokenizer involved), and the engine core's compiler calls it again before compiling against the
vocabulary (``compiler.py``).

Limits (a request over one is refused with a ValueError naming the limit):
``MAX_SPEC_BYTES`` of schema / grammar / regex text, ``MAX_SCHEMA_DEPTH`` levels of nested
objects and arrays in a JSON schema, ``MAX_CHOICES`` choices.
"""

from __future__ import annotations

import json
from typing import Any

from tessellm.structured_output.lark import is_lark, lark_to_ebnf
from tessellm.structured_output.params import StructuredOutputsParams

MAX_SPEC_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 32
MAX_CHOICES = 1024


def check_limits(params: StructuredOutputsParams) -> None:
    """Refuse a constraint over the size and nesting limits (before any grammar work)."""
    text = params.spec_text()
    if len(text.encode()) > MAX_SPEC_BYTES:
        raise ValueError(f"structured_outputs.{params.kind} is {len(text.encode())} bytes, over the "
                         f"limit of {MAX_SPEC_BYTES} bytes; simplify the {params.kind}.")
    if params.kind in ("json", "structural_tag"):
        depth = nesting_depth(json.loads(text))
        if depth > MAX_SCHEMA_DEPTH:
            raise ValueError(f"structured_outputs.{params.kind} nests {depth} levels of objects/arrays, "
                             f"over the limit of {MAX_SCHEMA_DEPTH}; flatten the schema.")
    if params.kind == "choice" and len(params.choice) > MAX_CHOICES:
        raise ValueError(f"structured_outputs.choice has {len(params.choice)} entries, over the limit "
                         f"of {MAX_CHOICES}.")


def nesting_depth(value: Any) -> int:
    """Levels of nested dicts/lists (iterative: no recursion limit to hit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def build_grammar(params: StructuredOutputsParams):
    """The xgrammar ``Grammar`` for a constraint; ValueError (naming the problem) if malformed."""
    import xgrammar as xgr

    check_limits(params)
    kind = params.kind
    try:
        if kind == "json":
            return xgr.Grammar.from_json_schema(params.spec_text(),
                                                any_whitespace=not params.disable_any_whitespace)
        if kind == "json_object":
            return xgr.Grammar.from_json_schema('{"type": "object"}',
                                                any_whitespace=not params.disable_any_whitespace)
        if kind == "regex":
            return xgr.Grammar.from_regex(params.regex)
        if kind == "choice":
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(_ebnf_string(c) for c in params.choice))
        if kind == "grammar":
            return xgr.Grammar.from_ebnf(lark_to_ebnf(params.grammar) if is_lark(params.grammar)
                                         else params.grammar)
        return _structural_tag(xgr, json.loads(params.spec_text()))
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - xgrammar reports a bad spec as RuntimeError & co.
        raise ValueError(f"structured_outputs.{kind} is invalid: {one_line(exc)}") from None


def _structural_tag(xgr, tag: dict):
    """vLLM's two forms: the legacy ``{"structures": [{begin, schema, end}], "triggers"}`` and
    xgrammar's own structural-tag format."""
    if isinstance(tag, dict) and "structures" in tag:
        items = [xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s.get("schema", {})), end=s["end"])
                 for s in tag["structures"]]
        return xgr.Grammar.from_structural_tag(items, list(tag.get("triggers", [])))
    return xgr.Grammar.from_structural_tag(json.dumps(tag))


def _ebnf_string(text: str) -> str:
    """``text`` as an EBNF string literal (json.dumps escapes quotes, backslashes, controls)."""
    return json.dumps(text, ensure_ascii=False)


def one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    line = text[-1] if text else type(exc).__name__
    # xgrammar prefixes "[time] /path/file.cc:line: "; keep the message.
    if ".cc:" in line:
        line = line.split(".cc:", 1)[1].split(":", 1)[-1].strip()
    return line[:500]
