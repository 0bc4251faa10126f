r"""Lark grammars (vLLM's ``guided_grammar`` / ``structured_outputs.grammar`` examples use them) as
the EBNF xgrammar compiles.

vLLM hands a grammar that looks like Lark to xgrammar after rewriting it as EBNF; so does
tessellm. The subset taken is what such grammars use: ``name: a b | c`` rules (``?name`` and
``!name`` marks and ``.N`` priorities dropped), continuation lines starting with ``|``, string
literals (``"x"i`` matches either case; ``"a".."z"`` a range), ``/regex/flags`` terminals
(``lark_regex.py``: the same strings in EBNF, flags ``i s x m u`` taken), ``-> alias``
dropped, ``x ~ n`` and ``x ~ m..n`` as ``x{n}`` and ``x{m,n}``, ``[x]`` for an optional
``x``, ``( ) * + ?`` as in EBNF, ``//`` comments. ``start`` is EBNF's ``root``.
``%import common.NAME`` (``-> ALIAS``, or ``common (A, B)``) brings Lark's common terminals
(``lark_common.py``); other imports and other directives are refused by name.

``%ignore TERM`` (any number of lines; a terminal name, string or regex each) lets the ignored
text appear where Lark's lexer skips it: before each terminal that a rule (a lowercase name)
uses, and at the end of the output; never inside a terminal (an uppercase name's definition
is taken as spelt)::

    start: "a" NUM             root ::= ((lark-ignored "a") (lark-ignored NUM)) lark-ignored
    NUM: DIGIT+ "." DIGIT+     NUM ::= (([0-9])) + "." (([0-9])) +
    DIGIT: /[0-9]/             DIGIT ::= ([0-9])
    %ignore " "                lark-ignored ::= [ ]*

A terminal's definition spells the terminals it uses in place, and the ignore rule is one class
star where every ignored terminal is one character or a class: xgrammar masks a chain of small
rules, or ``(X)*``, far more slowly (tens of ms over a 49k vocabulary, against microseconds).

The EBNF is the grammar's language as a context-free grammar. Lark's own lexer matches each
regex terminal greedily, so where one terminal can end inside another's text (``NAME NAME``
with no separator) Lark parses fewer strings than the EBNF allows.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

from tessellm.structured_output.lark_common import COMMON
from tessellm.structured_output.lark_regex import class_member, either_case, regex_ebnf

_RULE = re.compile(r"^[?!]?([A-Za-z_][A-Za-z0-9_]*)(?:\.-?\d+)?\s*:(?!:)(.*)$")
_RANGE = r'"[^"\\]"\.\."[^"\\]"'  # "a".."z"
_TOKEN = re.compile(r'//.*|' + _RANGE + r'|"(?:\\.|[^"\\])*"i?|/(?:\\.|[^/\\\n])+/[imslux]*|->\s*\w+'
                    r'|~\s*\d+(?:\.\.\d+)?|[A-Za-z_][A-Za-z0-9_]*|\S')
_TERMINAL = re.compile(r"_*[A-Z][A-Z0-9_]*$")  # Lark's terminal names; rules are lowercase
_IGNORED = "lark-ignored"  # the rule of %ignore'd text (no Lark name has a '-')
_EBNF_TOKEN = re.compile(r'\[(?:\\.|[^\]\\])*\]|"(?:\\.|[^"\\])*"|[()|]|[^\s()|"\[]+')


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
            members.append('"' if char == '\\"' else char if char.startswith("\\") else class_member(char))
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
            atom = f"[{class_member(token[1])}-{class_member(token[6])}]"
        elif token.startswith('"'):
            atom = either_case(token[:-1]) if token.endswith('"i') else token
        elif token.startswith("/") and len(token) > 1:
            end = token.rindex("/")
            atom = "(" + regex_ebnf(token[1:end], token[end + 1:]) + ")"
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
