"""Lark grammars (vLLM's ``guided_grammar`` / ``structured_outputs.grammar`` examples use them) as
the EBNF xgrammar compiles.

vLLM hands a grammar that looks like Lark to xgrammar after rewriting it as EBNF; so does
tessellm. The subset taken is what such grammars use: ``name: a b | c`` rules (``?name`` and
``!name`` marks and ``.N`` priorities dropped), continuation lines starting with ``|``, string
literals (an ``i`` flag dropped: matched as spelt), ``/regex/`` terminals (their text as an EBNF
character-class expression; flags dropped), ``[x]`` for an
optional ``x``, ``( ) * + ?`` as in EBNF, ``//`` comments and ``%ignore`` lines (dropped; the
grammar matches exactly what it spells, whitespace included). ``start`` is EBNF's ``root``.
``%import`` and other directives are refused by name.
"""

from __future__ import annotations

import re

_RULE = re.compile(r"^[?!]?([A-Za-z_][A-Za-z0-9_]*)(?:\.-?\d+)?\s*:(?!:)(.*)$")
_TOKEN = re.compile(r'//.*|"(?:\\.|[^"\\])*"i?|/(?:\\.|[^/\\\n])+/[imslux]*|[A-Za-z_][A-Za-z0-9_]*|\S')


def is_lark(grammar: str) -> bool:
    """Whether ``grammar`` reads as Lark: no ``::=`` rule, and a ``name:`` rule first."""
    if "::=" in grammar:
        return False
    lines = [ln.strip() for ln in grammar.splitlines()]
    first = next((ln for ln in lines if ln and not ln.startswith("//")), "")
    return bool(_RULE.match(first))


def lark_to_ebnf(grammar: str) -> str:
    """The EBNF of a Lark grammar (ValueError naming what is not taken)."""
    rules: list[list] = []  # [name, body text]
    for number, raw in enumerate(grammar.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("//") or line.startswith("%ignore"):
            continue
        if line.startswith("%"):
            raise ValueError(f"Lark grammar line {number}: {line.split()[0]} is not supported; "
                             "define the rule in the grammar itself.")
        if line.startswith("|") and rules:
            rules[-1][1] += " " + line
            continue
        match = _RULE.match(line)
        if not match:
            raise ValueError(f"Lark grammar line {number} is neither a rule ('name: ...') nor a "
                             f"continuation ('| ...'): {line!r}.")
        rules.append([_name(match.group(1)), match.group(2)])
    if not any(name == "root" for name, _ in rules):
        raise ValueError("The Lark grammar has no 'start' rule; name the top rule start.")
    return "\n".join(f"{name} ::= {_body(body)}" for name, body in rules)


def _name(name: str) -> str:
    return "root" if name == "start" else name


def _body(text: str) -> str:
    out = []
    for token in _TOKEN.findall(text):
        if token.startswith("//"):
            break  # a comment to the end of the line
        if token.startswith('"'):
            out.append(token.removesuffix("i") if token.endswith('"i') else token)
        elif token.startswith("/") and len(token) > 1:
            out.append("(" + token[1:token.rindex("/")] + ")")
        elif token == "[":
            out.append("(")
        elif token == "]":
            out.append(")?")
        elif token[0].isalpha() or token[0] == "_":
            out.append(_name(token))
        else:
            out.append(token)
    return " ".join(out)
