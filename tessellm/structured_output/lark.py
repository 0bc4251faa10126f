r"""Lark grammars (vLLM's ``guided_grammar`` / ``structured_outputs.grammar`` examples use them) as
the EBNF xgrammar compiles.

vLLM hands a grammar that looks like Lark to xgrammar after rewriting it as EBNF; so does
tessellm. The subset taken is what such grammars use: ``name: a b | c`` rules (``?name`` and
``!name`` marks and ``.N`` priorities dropped), continuation lines starting with ``|``, string
literals (``"x"i`` matches either case; ``"a".."z"`` a range), ``/regex/`` terminals (rewritten
as EBNF: literal characters quoted, classes kept, ``\d \w \s`` and ``.`` spelt out, ``(?:``
groups; flags other than ``s`` dropped; anchors and look-arounds refused), ``-> alias``
dropped, ``x ~ n`` and ``x ~ m..n`` as ``x{n}`` and ``x{m,n}``, ``[x]`` for an optional ``x``,
``( ) * + ?`` as in EBNF, ``//`` comments and ``%ignore`` lines (dropped; the grammar matches
exactly what it spells, whitespace included). ``start`` is EBNF's ``root``.
``%import`` and other directives are refused by name.
"""

from __future__ import annotations

import re

_RULE = re.compile(r"^[?!]?([A-Za-z_][A-Za-z0-9_]*)(?:\.-?\d+)?\s*:(?!:)(.*)$")
_RANGE = r'"[^"\\]"\.\."[^"\\]"'  # "a".."z"
_TOKEN = re.compile(r'//.*|' + _RANGE + r'|"(?:\\.|[^"\\])*"i?|/(?:\\.|[^/\\\n])+/[imslux]*|->\s*\w+'
                    r'|~\s*\d+(?:\.\.\d+)?|[A-Za-z_][A-Za-z0-9_]*|\S')
_CLASS_ESCAPES = {"d": "0-9", "w": "a-zA-Z0-9_", "s": " \\t\\n\\r\\f\\v"}
_ANY = {False: "[^\\n]", True: "[\\u0000-\\U0010FFFF]"}


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
        if re.fullmatch(_RANGE, token):
            out.append(f"[{_class_member(token[1])}-{_class_member(token[6])}]")
        elif token.startswith('"'):
            out.append(_either_case(token[:-1]) if token.endswith('"i') else token)
        elif token.startswith("/") and len(token) > 1:
            end = token.rindex("/")
            out.append("(" + _regex(token[1:end], "s" in token[end:]) + ")")
        elif token.startswith("->"):
            continue  # an alias names the tree node; the language is the same
        elif token.startswith("~"):
            low, _, high = token[1:].strip().partition("..")
            out.append("{" + low + ("," + high if high else "") + "}")
        elif token == "[":
            out.append("(")
        elif token == "]":
            out.append(")?")
        elif token[0].isalpha() or token[0] == "_":
            out.append(_name(token))
        else:
            out.append(token)
    return " ".join(out)


def _either_case(literal: str) -> str:
    """A ``"x"i`` literal: each letter either case (``[sS]``), other characters as spelt."""
    parts = re.findall(r"\\.|.", literal[1:-1])
    return "(" + " ".join(f"[{p.lower()}{p.upper()}]" if p.lower() != p.upper() else f'"{p}"'
                          for p in parts) + ")"


def _regex(regex: str, dot_all: bool) -> str:
    """A Lark ``/regex/`` as EBNF (ValueError naming what has no EBNF spelling)."""
    out, i = [], 0
    while i < len(regex):
        char = regex[i]
        if char == "[":
            end = i + 1 + (regex[i + 1:i + 2] == "^")
            end += regex[end:end + 1] == "]"  # a leading ] is a member
            while end < len(regex) and regex[end] != "]":
                end += 1 + (regex[end] == "\\")
            if end >= len(regex):
                raise ValueError(f"Lark regex /{regex}/: unclosed character class.")
            out.append(_char_class(regex[i:end + 1], regex))
            i = end + 1
        elif char == "\\" and i + 1 < len(regex):
            escape = regex[i + 1]
            if escape in "dws":
                out.append(f"[{_CLASS_ESCAPES[escape]}]")
            elif escape in "DWS":
                out.append(f"[^{_CLASS_ESCAPES[escape.lower()]}]")
            elif escape in "ntrfv":
                out.append(f'"\\{escape}"')
            elif escape.isalnum():
                raise ValueError(f"Lark regex /{regex}/: \\{escape} has no EBNF spelling; spell it "
                                 "with a character class.")
            else:
                out.append(_quoted(escape))
            i += 2
        elif regex.startswith("(?:", i):
            out.append("(")
            i += 3
        elif char in "^$" or regex.startswith("(?", i):
            raise ValueError(f"Lark regex /{regex}/: anchors, look-arounds and group flags have no "
                             "EBNF spelling; write the terminal without them.")
        elif char == "?" and out and (out[-1] in "*+?" or out[-1].endswith("}")):
            i += 1  # a lazy quantifier matches the same strings
        elif char in "()|*+?":
            out.append(char)
            i += 1
        elif char == "{" and (rep := re.match(r"\{\d+(?:,\d*)?\}", regex[i:])):
            out.append(rep.group(0))
            i += len(rep.group(0))
        elif char == ".":
            out.append(_ANY[dot_all])
            i += 1
        else:
            out.append(_quoted(char))
            i += 1
    return " ".join(out)


def _char_class(chars: str, regex: str) -> str:
    """A ``[...]`` class with ``\\d \\w \\s`` spelt out (EBNF classes take no class escapes)."""
    def member(match: re.Match) -> str:
        escape = match.group(1)
        if escape in _CLASS_ESCAPES:
            return _CLASS_ESCAPES[escape]
        if escape in "DWS" or (escape.isalnum() and escape not in "ntrfvu"):
            raise ValueError(f"Lark regex /{regex}/: \\{escape} inside a character class has no "
                             "EBNF spelling; list the characters.")
        return "\\" + escape if escape not in "/" else escape
    return re.sub(r"\\(.)", member, chars)


def _class_member(char: str) -> str:
    return "\\" + char if char in "]\\-^" else char


def _quoted(char: str) -> str:
    return '"' + ("\\" + char if char in '"\\' else char) + '"'
