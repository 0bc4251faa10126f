r"""Lark's ``/regex/flags`` terminals and ``"text"i`` literals as xgrammar EBNF (``lark.py``).

A regex is spelt item by item: literal characters quoted, classes kept, ``\d \w \s`` and
``.`` spelt out, ``(?:`` groups, ``{m,n}`` repeats, lazy quantifiers as greedy ones (the same
strings); anchors, look-arounds, group flags and escapes with no EBNF spelling are refused by
name. Flags: ``i`` gives each letter its other cases, as Python's IGNORECASE (``[a-z]`` also
matches ``A-Z``, the Kelvin sign, the long s and the dotless i; a class is then written as its
merged ranges); ``s`` lets ``.`` match a newline; ``x`` drops unescaped spaces and ``#``
comments from the pattern; ``m`` and ``u`` change nothing here (no anchors are taken; text
patterns are Unicode already); ``l`` is refused (Python refuses it on text).

xgrammar before 0.2.8 lets a negated class's non-ASCII members through, so such a class is
spelt as the ranges it matches.
"""

from __future__ import annotations

import bisect
import functools
import re

_CLASS_ESCAPES = {"d": "0-9", "w": "a-zA-Z0-9_", "s": " \\t\\n\\r\\f\\v"}
_LAST_CASED = 0x1FFFF  # no code point past the first two planes has another case (Unicode 15)
_ANY = {False: "[^\\n]", True: "[\\u0000-\\U0010FFFF]"}


def either_case(literal: str) -> str:
    """A ``"x"i`` literal: each letter either case (``[sS]``), other characters as spelt."""
    parts = re.findall(r"\\.|.", literal[1:-1])
    return "(" + " ".join(_char(p, True) if len(p) == 1 else f'"{p}"' for p in parts) + ")"


def regex_ebnf(regex: str, flags: str) -> str:
    """A Lark ``/regex/flags`` as EBNF (ValueError naming what has no EBNF spelling). Flags:
    ``i`` each letter either case, ``s`` ``.`` matches newlines, ``x`` spaces and ``#``
    comments in the pattern are not part of it; ``m`` and ``u`` change nothing here (anchors
    are refused; text patterns are Unicode already)."""
    if "l" in flags:
        raise ValueError(f"Lark regex /{regex}/{flags}: the l (locale) flag is for byte patterns and "
                         "Python refuses it on text; drop it.")
    fold = "i" in flags
    if "x" in flags:
        regex = _verbose(regex)
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
            out.append(_char_class(regex[i:end + 1], regex, fold))
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
                out.append(_char(escape, fold))
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
            out.append(_ANY["s" in flags])
            i += 1
        else:
            out.append(_char(char, fold))
            i += 1
    return " ".join(out)


def _verbose(regex: str) -> str:
    """The pattern of an ``x``-flagged regex: unescaped spaces outside classes dropped, ``#`` to
    the end a comment."""
    out, i, in_class = [], 0, False
    while i < len(regex):
        char = regex[i]
        if char == "\\":
            out.append(regex[i:i + 2])
            i += 2
            continue
        if not in_class and char == "#":
            break
        if in_class or not char.isspace():
            out.append(char)
        if char == "[" and not in_class:
            in_class = True
            lead = re.match(r"\^?\]?", regex[i + 1:]).group(0)  # a leading ] is a member
            out.append(lead)
            i += len(lead)
        elif char == "]":
            in_class = False
        i += 1
    return "".join(out)


def _char(char: str, fold: bool) -> str:
    """One character of a regex as EBNF: quoted, or a class of its cases under the i flag."""
    cases = sorted(_cases(char)) if fold else [char]
    if len(cases) == 1:
        return _quoted(char)
    return "[" + "".join(class_member(c) for c in cases) + "]"


def _cases(char: str) -> frozenset[str]:
    """``char`` and the characters it matches under the i flag: those joined to it by
    one-character lower and upper cases (``k``: ``K`` and the Kelvin sign, as Python's
    IGNORECASE)."""
    return _fold_groups()[1].get(char, frozenset(char))


@functools.cache
def _fold_groups() -> tuple[list[int], dict[str, frozenset[str]]]:
    """Every cased code point, sorted, and each one's group of characters equal under case
    folding (built once, on the first i flag: a pass over the first two planes, ~0.1 s)."""
    parent: dict[str, str] = {}

    def root(char: str) -> str:
        while parent.get(char, char) != char:
            char = parent[char]
        return char

    for code in range(_LAST_CASED + 1):
        char = chr(code)
        for other in (char.lower(), char.upper()):
            if len(other) == 1 and other != char:
                parent.setdefault(char, char)
                parent.setdefault(other, other)
                parent[root(other)] = root(char)
    groups: dict[str, set[str]] = {}
    for char in parent:
        groups.setdefault(root(char), set()).add(char)
    members = {char: frozenset(group) for group in groups.values() for char in group}
    return sorted(ord(char) for char in members), members


def _char_class(chars: str, regex: str, fold: bool) -> str:
    """A ``[...]`` class with ``\\d \\w \\s`` spelt out (EBNF classes take no class escapes),
    and under the i flag each letter's other cases added."""
    def member(match: re.Match) -> str:
        escape = match.group(1)
        if escape in _CLASS_ESCAPES:
            return _CLASS_ESCAPES[escape]
        if escape in "DWS" or (escape.isalnum() and escape not in "ntrfvu"):
            raise ValueError(f"Lark regex /{regex}/: \\{escape} inside a character class has no "
                             "EBNF spelling; list the characters.")
        return "\\" + escape if escape not in "/" else escape
    spelt = re.sub(r"\\(.)", member, chars)
    negated = spelt.startswith("[^")
    ranges = _ranges(spelt[2:-1] if negated else spelt[1:-1])
    ranges += [(ord(c), ord(c)) for c in (_other_cases(ranges) if fold else ())]
    if negated and any(high > 0x7F for _, high in ranges):
        # xgrammar before 0.2.8 lets a negated class's non-ASCII members through: spelt as the
        # ranges it matches instead
        return "[" + "".join(_span(low, high) for low, high in _complement(ranges)) + "]"
    if not fold:
        return spelt
    return ("[^" if negated else "[") + "".join(_span(low, high) for low, high in _merged(ranges)) + "]"


def _ranges(members: str) -> list[tuple[int, int]]:
    """A class's members (EBNF spelling, no brackets) as (first, last) code points."""
    items = [_decode(m) for m in re.findall(r"\\u[0-9a-fA-F]{4}|\\.|.", members)]
    found, i = [], 0
    while i < len(items):
        if i + 2 < len(items) and items[i + 1] == ("-", False):
            found.append((ord(items[i][0]), ord(items[i + 2][0])))
            i += 3
        else:
            found.append((ord(items[i][0]), ord(items[i][0])))
            i += 1
    return found


def _other_cases(ranges: list[tuple[int, int]]) -> set[str]:
    """The characters that a class matches only through the i flag: the other cases of its
    letters, ranges included."""
    found: set[str] = set()
    cased = _fold_groups()[0]
    for low, high in ranges:
        for code in cased[bisect.bisect_left(cased, low):bisect.bisect_right(cased, high)]:
            found |= _cases(chr(code))
    return found


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``ranges`` sorted, those that overlap or touch made one."""
    out: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if out and low <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], high))
        else:
            out.append((low, high))
    return out


def _complement(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The code points outside ``ranges``, as ranges."""
    gaps, start = [], 0
    for low, high in _merged(ranges):
        if low > start:
            gaps.append((start, low - 1))
        start = high + 1
    return gaps + ([(start, 0x10FFFF)] if start <= 0x10FFFF else [])


def _span(low: int, high: int) -> str:
    """One range of a class, its ends escaped past ASCII (a surrogate end has no UTF-8)."""
    def end(code: int) -> str:
        if code < 0x80:
            return class_member(chr(code))
        return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
    return end(low) if low == high else f"{end(low)}-{end(high)}"


def _decode(member: str) -> tuple[str, bool]:
    """A class member's character, and whether it was escaped (an escaped ``-`` is no range)."""
    if member.startswith("\\u"):
        return chr(int(member[2:], 16)), True
    if member.startswith("\\"):
        return {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v"}.get(member[1], member[1]), True
    return member, False


def class_member(char: str) -> str:
    if char in "]\\-^":
        return "\\" + char
    return char if char.isprintable() else f"\\u{ord(char):04x}" if ord(char) < 0x10000 else char


def _quoted(char: str) -> str:
    return '"' + ("\\" + char if char in '"\\' else char) + '"'
