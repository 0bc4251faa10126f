"""Lark grammars rewritten as EBNF (structured_output/lark.py): xgrammar, given the rewrite,
accepts exactly the strings the Lark grammar's own regexes and literals match."""

import re

import pytest

xgr = pytest.importorskip("xgrammar")  # the [test] extra has it; a GPU image may not
from xgrammar.testing import _is_grammar_accept_string  # noqa: E402

from tessellm.structured_output.lark import lark_to_ebnf


def accepts(lark: str, text: str) -> bool:
    return _is_grammar_accept_string(xgr.Grammar.from_ebnf(lark_to_ebnf(lark)), text)


REGEXES = [
    (r"-?[0-9]+(\.[0-9]+)?", ["0", "-12", "3.25", "3.", "+1", "a"]),
    (r'"[^"]*"', ['""', '"ab c"', '"a"b"', "ab"]),
    (r"abc|de", ["abc", "de", "ab", "abcde"]),
    (r"\d+", ["123", "", "1a"]),
    (r"[a-z_]\w*", ["x1_Z", "_", "1x"]),
    (r"(?:ab)+", ["ab", "abab", "aba"]),
    (r"a.c", ["abc", "a-c", "a\nc", "ac"]),
    (r"[\d.]+", ["1.5", "..", "a"]),
    (r"x{2,3}", ["x", "xx", "xxx", "xxxx"]),
    (r"a+?b", ["ab", "aab", "b"]),
    (r"\(\w+\)", ["(ab)", "ab", "(a"]),
]


@pytest.mark.parametrize("regex,texts", REGEXES)
def test_regex_terminals_match_what_the_regex_matches(regex, texts):
    lark = f"start: TERM\nTERM: /{regex}/"
    for text in texts:
        assert accepts(lark, text) == bool(re.fullmatch(regex, text)), (regex, text)


def test_aliases_case_flags_and_repeats():
    assert accepts('start: "a" b -> pair\n    | "c" -> single\nb: "b"', "ab")
    assert accepts('start: "a" b -> pair\n    | "c" -> single\nb: "b"', "c")
    lark = 'start: "select"i " " NAME ~ 2..3\nNAME: /[a-z]/'
    for text, ok in [("SeLeCt ab", True), ("select abc", True), ("select a", False),
                     ("selec ab", False)]:
        assert accepts(lark, text) == ok, text
    assert accepts('start: "x" ~ 2', "xx") and not accepts('start: "x" ~ 2', "x")
    digits = 'start: DIGIT+\nDIGIT: "0".."9"'
    assert accepts(digits, "0429") and not accepts(digits, "04a")


def test_a_dot_all_regex_matches_newlines():
    assert accepts("start: /a.c/s", "a\nc")
    assert not accepts("start: /a.c/", "a\nc")


@pytest.mark.parametrize("regex", [r"^ab", r"a(?=b)", r"\bword", r"[\W]"])
def test_regex_without_an_ebnf_spelling_is_refused_by_name(regex):
    with pytest.raises(ValueError, match=re.escape(f"/{regex}/")):
        lark_to_ebnf(f"start: /{regex}/")
