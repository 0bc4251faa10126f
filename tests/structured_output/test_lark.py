"""Lark grammars rewritten as EBNF (structured_output/lark.py): xgrammar, given the rewrite,
accepts exactly the strings the Lark grammar's own regexes and literals match, with ``%ignore``
and regex flags as Lark reads them (checked against the ``lark`` package when it is installed),
and generation under such a grammar gives a sentence of it."""

import importlib.util
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


def lark_parses(lark_text: str, text: str) -> bool:
    """Whether the ``lark`` package itself (its default Earley parser) parses ``text``."""
    import lark

    try:
        lark.Lark(lark_text).parse(text)
        return True
    except lark.exceptions.LarkError:
        return False


HAS_LARK = importlib.util.find_spec("lark") is not None
SQL = """
    ?start: "select "i columns " from "i NAME
    columns: NAME ("," NAME)*
    NAME: /[a-z_][a-z0-9_]{0,3}/i
    %ignore " "
    %ignore /\t+/
"""
IMPORTS = """
    %import common.WS
    %import common (SIGNED_NUMBER, ESCAPED_STRING, C_COMMENT)
    %import common.CNAME -> NAME
    start: pair ("," pair)*
    pair: NAME "=" (SIGNED_NUMBER | ESCAPED_STRING)
    %ignore WS
    %ignore C_COMMENT
"""
VLLM_SQL = """
start: select_statement
select_statement: "SELECT" column "from" table "where" condition
column: "col_1" | "col_2"
table: "table_1" | "table_2"
condition: column "=" number
number: "1" | "2"
"""  # vLLM's structured-output tests' Lark grammar: no %ignore, so no space is allowed
# (grammar, text, whether Lark parses it): what Lark's own parser says of each (HAS_LARK checks)
LARK_PARSES = [
    (VLLM_SQL, [("SELECTcol_1fromtable_2wherecol_2=1", True), ("SELECT col_1 from table_2 where col_2=1", False)]),
    ('start: "a" "b"\n%ignore " "', [(" a  b ", True), ("ab", True), ("a\tb", False), (" ", False)]),
    (SQL, [("SELECT a,b FROM t", True), ("select  Ab ,\tc  from  T1 ", True), ("selecta from b", False),
           ("select a from\tb", False), ("select a b from c", False), ("select abcde from c", False)]),
    ('start: NUM\nNUM: DIGIT "." DIGIT\nDIGIT: /[0-9]/\n%ignore " "', [(" 1.2 ", True), ("1 .2", False)]),
    ('start: WORD+\nWORD: /[a-z]+/\n%ignore WS\nWS: /[ \\n]+/', [("ab\n cd", True), ("ab-cd", False)]),
    ("start: /[a-cé]x/i", [("Bx", True), ("ÉX", True), ("dx", False)]),
    ("start: /[^k]+/i", [("abc", True), ("K", False), ("\u212a", False)]),  # \u212a: the Kelvin sign
    ("start: /[^é\\]]x/", [("ex", True), ("éx", False), ("]x", False)]),
    ("start: /a b\\ c/x", [("ab c", True), ("a b c", False)]),
    (IMPORTS, [('a = 1, b_2="x\\"y"', True), ("a=-.5E-3 /* c * / */ ,b=2", True), ("\n a\t=\n1 ", True),
               ('a = "x', False), ("2a=1", False), ('a="x\\\\\\"', False), ("a=1/* */*/", False),
               ("a=+1e", False)]),
    ('start: "n\\t"i /[0-9]/', [("N\t1", True), ("n\\T1", False)]),
]


@pytest.mark.parametrize("lark_text,cases", LARK_PARSES)
def test_ignore_and_regex_flags_accept_what_lark_parses(lark_text, cases):
    for text, parses in cases:
        assert accepts(lark_text, text) == parses, (lark_text, text)
        if HAS_LARK:
            assert lark_parses(lark_text, text) == parses, (lark_text, text)


def test_the_locale_flag_and_imports_other_than_common_terminals_are_refused_by_name():
    with pytest.raises(ValueError, match=r"/ab/l: the l \(locale\) flag"):
        lark_to_ebnf("start: /ab/l")
    with pytest.raises(ValueError, match="common.NOPE is not one of Lark's common terminals"):
        lark_to_ebnf("%import common.NOPE\nstart: NOPE")
    with pytest.raises(ValueError, match="imports from outside Lark's common terminals"):
        lark_to_ebnf("%import .mine.X\nstart: X")


@pytest.fixture(scope="module")
def tiny_llm(tiny_llm_args):
    from tessellm import LLM

    with LLM(**tiny_llm_args) as llm:
        yield llm


def test_generation_under_ignore_and_case_flags_is_a_sentence_of_the_grammar(tiny_llm):
    """A random tiny model sampling under the SQL grammar above: every output is a whole
    sentence (Lark parses it), and the ignored spaces and tabs and the other letter cases are
    open to it (some output uses one of them)."""
    from tessellm import SamplingParams
    from tessellm.structured_output import StructuredOutputsParams

    params = [SamplingParams(max_tokens=60, temperature=1.0, seed=seed,
                             structured_outputs=StructuredOutputsParams(grammar=SQL)) for seed in range(6)]
    outs = [o.outputs[0] for o in tiny_llm.generate(["Write a query."] * 6, params, use_tqdm=False)]
    texts = [o.text for o in outs]
    assert all(o.finish_reason == "stop" for o in outs), texts
    grammar = xgr.Grammar.from_ebnf(lark_to_ebnf(SQL))
    for text in texts:
        assert lark_parses(SQL, text) if HAS_LARK else _is_grammar_accept_string(grammar, text), text
    assert any(re.search(r"[ \t]{2}|\t|[A-Z]", text) for text in texts), texts
