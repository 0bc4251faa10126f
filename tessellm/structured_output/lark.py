r"""Lark grammars (vLLM's ``guided_grammar`` / ``structured_outputs.grammar`` examples use them) as
the EBNF xgrammar compiles.

vLLM hands a grammar that looks like Lark to xgrammar after rewriting it as EBNF; so does
tessellm. The subset taken is what such grammars use: ``name: a b | c`` rules (``?name`` and
``!name`` marks and ``.N`` priorities dropped), continuation lines starting with ``|``, string
literals (``"x"i`` matches either case; ``"a".."z"`` a range), ``/regex/flags`` terminals
(rewritten as EBNF: literal characters quoted, classes kept, ``\d \w \s`` and ``.`` spelt out,
``(?:`` groups; anchors and look-arounds refused), ``-> alias`` dropped, ``x ~ n`` and
``x ~ m..n`` as ``x{n}`` and ``x{m,n}``, ``[x]`` for an optional ``x``, ``( ) * + ?`` as in
EBNF, ``//`` comments. ``start`` is EBNF's ``root``. ``%import common.NAME`` (``-> ALIAS``,
or ``common (A, B)``) brings Lark's common terminals (``lark_common.py``); other imports and
other directives are refused by name.

Regex flags: ``i`` gives each letter its other cases, as Python's IGNORECASE (``[a-z]`` also
matches ``A-Z``, the Kelvin sign and the long s); ``s`` lets ``.`` match a newline; ``x`` drops
unescaped spaces and ``#`` comments from the pattern; ``m`` and ``u`` change nothing here (no
anchors are taken; text patterns are Unicode already); ``l`` is refused (Python refuses it on
text).

``%ignore TERM`` (any number of lines; a terminal name, string or regex each) lets the ignored
text appear where Lark's lexer skips it: before each terminal that a rule (a lowercase name)
uses, and at the end of the output; never inside a terminal (an uppercase name's definition
is taken as spelt)::

    start: "a" NUM             root ::= ((lark-ignored "a") (lark-ignored NUM)) lark-ignored
    NUM: DIGIT+ "." DIGIT+     NUM ::= DIGIT + "." DIGIT +
    %ignore " "                lark-ignored ::= (" ")*

The EBNF is the grammar's language as a context-free grammar. Lark's own lexer matches each
regex terminal greedily, so where one terminal can end inside another's text (``NAME NAME``
with no separator) Lark parses fewer strings than the EBNF allows.
"""

from __future__ import annotations

import bisect
import functools
import re
from typing import Callable, Optional

from tessellm.structured_output.lark_common import COMMON

_RULE = re.compile(r"^[?!]?([A-Za-z_][A-Za-z0-9_]*)(?:\.-?\d+)?\s*:(?!:)(.*)$")
_RANGE = r'"[^"\\]"\.\."[^"\\]"'  # "a".."z"
_TOKEN = re.compile(r'//.*|' + _RANGE + r'|"(?:\\.|[^"\\])*"i?|/(?:\\.|[^/\\\n])+/[imslux]*|->\s*\w+'
                    r'|~\s*\d+(?:\.\.\d+)?|[A-Za-z_][A-Za-z0-9_]*|\S')
_CLASS_ESCAPES = {"d": "0-9", "w": "a-zA-Z0-9_", "s": " \\t\\n\\r\\f\\v"}
_TERMINAL = re.compile(r"_*[A-Z][A-Z0-9_]*$")  # Lark's terminal names; rules are lowercase
_IGNORED = "lark-ignored"  # the rule of %ignore'd text (no Lark name has a '-')
_EBNF_TOKEN = re.compile(r'\[(?:\\.|[^\]\\])*\]|"(?:\\.|[^"\\])*"|[()|]|[^\s()|"\[]+')
_ANY = {False: "[^\\n]", True: "[\\u0000-\\U0010FFFF]"}


def is_lark(grammar: str) -> bool:
    """Whether ``grammar`` reads as Lark: no ``::=`` rule, and a ``name:`` rule first (after
    comments and ``%`` directives)."""
    if "::=" in grammar:
        return False
    lines = [ln.strip() for ln in grammar.splitlines()]
    first = next((ln for ln in lines if ln and not ln.startswith(("//", "%"))), "")
    return bool(_RULE.match(first))


def lark_to_ebnf(grammar: str) -> str:
    """The EBNF of a Lark grammar (ValueError naming what is not taken)."""
    rules, ignored, imports = _read(grammar)
    if not any(name == "start" for name, _ in rules):
        raise ValueError("The Lark grammar has no 'start' rule; name the top rule start.")
    rules += _imported(imports, {name for name, _ in rules})
    skip = _IGNORED if ignored else None
    lark_terminals = {name: body for name, body in rules if _TERMINAL.match(name)}
    terminals = _inlined(lark_terminals)
    lines = []
    for name, body in rules:
        ebnf = terminals[name] if name in terminals else _body(body, skip)
        if name == "start" and skip:
            ebnf = f"({ebnf}) {skip}"  # ignored text may also end the output
        lines.append(f"{_name(name)} ::= {ebnf}")
    if ignored:
        units = [_one_repeat(lark_terminals.get(text, text)) for text in ignored]
        lines.append(f"{_IGNORED} ::= {_ignored_rule([_body(unit, None, terminals.get) for unit in units])}")
    return "\n".join(lines)


def _ignored_rule(units: list[str]) -> str:
    """Any run of the ignored units (EBNF): ``[ \\t]*`` when each is one character or a class,
    which xgrammar runs as one element; ``(a | b)*`` otherwise, a rule whose mask costs ~20 ms
    over a 49k vocabulary where an ignored token can start the next (``" foo"``)."""
    members = [_class_members(unit) for unit in units]
    if None in members:
        return f"({' | '.join(units)})*"
    return "[" + "".join(members) + "]*"


def _class_members(unit: str) -> Optional[str]:
    """What ``unit`` (EBNF) matches as a class's members, when it is one-character strings and
    classes joined by ``|`` (in any parentheses); else None."""
    tokens = [t for t in _EBNF_TOKEN.findall(unit) if t not in "()"]
    if tokens[1::2] != ["|"] * (len(tokens) // 2) or len(tokens) % 2 == 0:
        return None
    members = []
    for token in tokens[::2]:
        char = re.fullmatch(r'"(\\.|[^"\\])"', token)
        if char:
            char = char.group(1)
            members.append('"' if char == '\\"' else char if char.startswith("\\") else _class_member(char))
        elif token.startswith("[") and not token.startswith("[^"):
            members.append(token[1:-1])
        else:
            return None
    return "".join(members)


def _one_repeat(text: str) -> str:
    """An ignored terminal ``X+`` (``/[ \\t]+/``, ``(" "|/\\t/)+``) as ``X``: the ignore rule repeats
    it anyway, and ``(X+)*`` costs xgrammar a mask of ~20 ms over a 49k vocabulary where one
    ignored token can start the next (``" foo"``), against microseconds for ``X*``."""
    tokens = _TOKEN.findall(text.strip())
    if len(tokens) > 1 and tokens[-1] == "+" and (len(tokens) == 2 or _one_group(tokens[:-1])):
        return " ".join(tokens[:-1])
    if len(tokens) == 1 and tokens[0].startswith("/"):
        end = tokens[0].rindex("/")
        if re.fullmatch(r"(?:\[\^?(?:\\.|[^\]\\])+\]|\\.|[^\\()\[\]|*+?{}.])\+", tokens[0][1:end]):
            return tokens[0][:end - 1] + tokens[0][end:]
    return text


def _one_group(tokens: list[str]) -> bool:
    """Whether ``tokens`` are one parenthesised group: ``(`` ... its own ``)``."""
    depth = 0
    for i, token in enumerate(tokens):
        depth += {"(": 1, ")": -1}.get(token, 0)
        if depth == 0:
            return i == len(tokens) - 1 and token == ")"
    return False


def _read(grammar: str) -> tuple[list[list[str]], list[str], list[tuple[str, str]]]:
    """A Lark grammar's rules ([name, body text]), its ``%ignore`` terminals, and the
    (name, alias) pairs of its ``%import common`` lines."""
    rules: list[list[str]] = []
    ignored: list[str] = []
    imports: list[tuple[str, str]] = []
    for number, raw in enumerate(grammar.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("//"):
            continue
        if line.startswith("%ignore"):
            ignored.append(line[len("%ignore"):].strip())
        elif line.startswith("%import"):
            imports += _import_names(line, number)
        elif line.startswith("%"):
            raise ValueError(f"Lark grammar line {number}: {line.split()[0]} is not supported; "
                             "define the rule in the grammar itself.")
        elif line.startswith("|") and rules:
            rules[-1][1] += " " + line
        elif match := _RULE.match(line):
            rules.append([match.group(1), match.group(2)])
        else:
            raise ValueError(f"Lark grammar line {number} is neither a rule ('name: ...') nor a "
                             f"continuation ('| ...'): {line!r}.")
    return rules, ignored, imports


def _import_names(line: str, number: int) -> list[tuple[str, str]]:
    """``%import common.NAME``, ``%import common.NAME -> ALIAS``, ``%import common (A, B)``."""
    one = re.fullmatch(r"%import\s+common\.(\w+)(?:\s*->\s*(\w+))?", line)
    if one:
        return [(one.group(1), one.group(2) or one.group(1))]
    many = re.fullmatch(r"%import\s+common\s*\(([\w\s,]+)\)", line)
    if many:
        return [(name, name) for name in re.findall(r"\w+", many.group(1))]
    raise ValueError(f"Lark grammar line {number}: {line!r} imports from outside Lark's common "
                     "terminals; only %import common.NAME (or common (A, B)) is taken: define the "
                     "rule in the grammar itself.")


def _imported(imports: list[tuple[str, str]], defined: set[str]) -> list[list[str]]:
    """The rules of the imported common terminals, and of those they use (a name the grammar
    defines itself is the grammar's)."""
    common = {name: body for name, body in _read(COMMON)[0]}
    out: list[list[str]] = []
    wanted = []
    for name, alias in imports:
        if name not in common:
            raise ValueError(f"Lark grammar: common.{name} is not one of Lark's common terminals "
                             f"({', '.join(sorted(common))}); define it in the grammar itself.")
        if alias != name and alias not in defined:
            out.append([alias, name])
            defined = defined | {alias}
        wanted.append(name)
    while wanted:
        name = wanted.pop()
        if name in defined:
            continue
        defined = defined | {name}
        out.append([name, common[name]])
        wanted += [used for used in re.findall(r"\b_?[A-Z][A-Z_]*\b", common[name]) if used in common]
    return out


def _inlined(terminals: dict[str, str]) -> dict[str, str]:
    """Each terminal's EBNF with the terminals it uses spelt in place: xgrammar masks a chain
    of small rules far more slowly than one expression (``common.CNAME`` through ``LETTER`` and
    ``UCASE_LETTER``: 12 ms a mask over a 49k vocabulary, against microseconds inlined)."""
    done: dict[str, str] = {}

    def spell(name: str, path: tuple[str, ...]) -> Optional[str]:
        if name not in terminals:
            return None
        if name in path:
            raise ValueError(f"Lark terminal {name} uses itself ({' -> '.join(path + (name,))}); Lark "
                             "terminals cannot recurse: make it a rule (a lowercase name).")
        if name not in done:
            done[name] = _body(terminals[name], None, lambda used: spell(used, path + (name,)))
        return done[name]

    for name in terminals:
        spell(name, ())
    return done


def _name(name: str) -> str:
    return "root" if name == "start" else name


def _body(text: str, skip: Optional[str], inline: Callable[[str], Optional[str]] = lambda name: None) -> str:
    """A rule's expansions as EBNF. ``skip``: the rule of ignored text, put before each terminal
    of a rule (where Lark's lexer skips it: between tokens, never inside a terminal).
    ``inline``: a name's EBNF to spell in its place (None: referred to by name)."""
    out = []
    for token in _TOKEN.findall(text):
        if token.startswith("//"):
            break  # a comment to the end of the line
        terminal = True
        if re.fullmatch(_RANGE, token):
            atom = f"[{_class_member(token[1])}-{_class_member(token[6])}]"
        elif token.startswith('"'):
            atom = _either_case(token[:-1]) if token.endswith('"i') else token
        elif token.startswith("/") and len(token) > 1:
            end = token.rindex("/")
            atom = "(" + _regex(token[1:end], token[end + 1:]) + ")"
        elif token[0].isalpha() or token[0] == "_":
            spelt = inline(token)
            atom, terminal = _name(token) if spelt is None else f"({spelt})", bool(_TERMINAL.match(token))
        elif token.startswith("->"):
            continue  # an alias names the tree node; the language is the same
        elif token.startswith("~"):
            low, _, high = token[1:].strip().partition("..")
            atom, terminal = "{" + low + ("," + high if high else "") + "}", False
        else:
            atom, terminal = {"[": "(", "]": ")?"}.get(token, token), False
        out.append(f"({skip} {atom})" if terminal and skip else atom)
    return " ".join(out)


def _either_case(literal: str) -> str:
    """A ``"x"i`` literal: each letter either case (``[sS]``), other characters as spelt."""
    parts = re.findall(r"\\.|.", literal[1:-1])
    return "(" + " ".join(_char(p, True) if len(p) == 1 else f'"{p}"' for p in parts) + ")"


def _regex(regex: str, flags: str) -> str:
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
    return "[" + "".join(_class_member(c) for c in cases) + "]"


def _cases(char: str) -> frozenset[str]:
    """``char`` and the characters it matches under the i flag: those joined to it by
    one-character lower and upper cases (``k``: ``K`` and the Kelvin sign, as Python's
    IGNORECASE)."""
    return _fold_groups()[1].get(char, frozenset(char))


@functools.cache
def _fold_groups() -> tuple[list[int], dict[str, frozenset[str]]]:
    """Every cased code point, sorted, and each one's group of characters equal under case
    folding (built once, on the first i flag: a pass over Unicode)."""
    parent: dict[str, str] = {}

    def root(char: str) -> str:
        while parent.get(char, char) != char:
            char = parent[char]
        return char

    for code in range(0x110000):
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
            return _class_member(chr(code))
        return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
    return end(low) if low == high else f"{end(low)}-{end(high)}"


def _decode(member: str) -> tuple[str, bool]:
    """A class member's character, and whether it was escaped (an escaped ``-`` is no range)."""
    if member.startswith("\\u"):
        return chr(int(member[2:], 16)), True
    if member.startswith("\\"):
        return {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v"}.get(member[1], member[1]), True
    return member, False


def _class_member(char: str) -> str:
    if char in "]\\-^":
        return "\\" + char
    return char if char.isprintable() else f"\\u{ord(char):04x}" if ord(char) < 0x10000 else char


def _quoted(char: str) -> str:
    return '"' + ("\\" + char if char in '"\\' else char) + '"'
