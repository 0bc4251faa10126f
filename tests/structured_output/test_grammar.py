"""Structured-output pieces without a model: params, limits, compile cache, matcher state."""

from __future__ import annotations

import json

import pytest
import torch

from tessellm.core.sampling_params import SamplingParams
from tessellm.structured_output.grammar import MAX_SCHEMA_DEPTH, MAX_SPEC_BYTES, build_grammar
from tessellm.structured_output.params import StructuredOutputsParams as S

xgr = pytest.importorskip("xgrammar")


def test_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one"):
        S()
    with pytest.raises(ValueError, match="exactly one.*json, regex"):
        S(json={"type": "object"}, regex="a")
    with pytest.raises(ValueError, match="choice"):
        S(choice=[])
    with pytest.raises(ValueError, match="unknown field"):
        S.from_dict({"jsn": {}})


def test_travels_as_a_dict_in_sampling_params():
    import dataclasses

    p = SamplingParams(structured_outputs=S(json={"type": "object"}, disable_any_whitespace=True))
    back = SamplingParams(**dataclasses.asdict(p))  # what msgpack carries to the core
    assert back.structured_outputs == p.structured_outputs
    assert back.structured_outputs.cache_key() == p.structured_outputs.cache_key()


def test_cache_key_keeps_property_order():
    a = S(json={"properties": {"a": {}, "b": {}}})
    b = S(json={"properties": {"b": {}, "a": {}}})
    assert a.cache_key() != b.cache_key()  # the order of properties orders the output
    assert a.cache_key() == S(json=json.dumps({"properties": {"a": {}, "b": {}}})).cache_key()


@pytest.mark.parametrize("params,words", [
    (S(json={"type": "objectx"}), ["structured_outputs.json is invalid", "objectx"]),
    (S(json="{not json"), ["not valid JSON"]),
    (S(regex="[a-"), ["structured_outputs.regex is invalid"]),
    (S(grammar="root ::= "), ["structured_outputs.grammar is invalid"]),
    (S(json={"a": "x" * MAX_SPEC_BYTES}), ["bytes, over the limit"]),
    (S(json=json.loads('{"items":' * (MAX_SCHEMA_DEPTH + 1) + "{}" + "}" * (MAX_SCHEMA_DEPTH + 1))),
     ["nests", "flatten"]),
])
def test_malformed_or_oversized_is_refused_by_name(params, words):
    with pytest.raises(ValueError) as info:
        build_grammar(params)
    for w in words:
        assert w in str(info.value)


@pytest.fixture(scope="module")
def tokenizer():
    from tessellm.config import resolve_model
    from tessellm.loader.model_loader import load_tokenizer

    src = resolve_model(None)
    return load_tokenizer(src.path, src.kind, None), src.hf_config.vocab_size


def test_compile_cache_and_matcher(tokenizer):
    from tessellm.structured_output.compiler import GrammarCompilerPool, RequestGrammar

    tok, vocab = tokenizer
    pool = GrammarCompilerPool(tok, vocab, [2])
    try:
        schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
        f1 = pool.submit(S(json=schema, disable_any_whitespace=True))
        f2 = pool.submit(S(json=json.dumps(schema), disable_any_whitespace=True))
        assert f1 is f2 and pool.num_compiles == 1  # cached by the spec's hash
        bad = RequestGrammar(pool.submit(S(json={"type": "objectx"})))
        bad.future.exception(timeout=60)
        assert bad.ready and bad.error and "objectx" in bad.error

        g = RequestGrammar(f1)
        f1.result(timeout=60)
        assert g.ready and g.matcher is not None
        bitmask = xgr.allocate_token_bitmask(1, vocab)
        g.fill_bitmask(bitmask, 0)
        from tessellm.backends.reference.logits import unpack_bitmask

        allowed = unpack_bitmask(bitmask, vocab)[0]
        assert allowed[tok.encode("{", add_special_tokens=False)[0]]
        assert not allowed[tok.encode("hello", add_special_tokens=False)[0]]
        ids = tok.encode('{"n": 42}', add_special_tokens=False)  # compact: json.dumps' separators
        for t in ids:
            assert g.accept(t)
        g.fill_bitmask(bitmask, 0)
        before = bitmask.clone()
        assert unpack_bitmask(bitmask, vocab)[0].nonzero().flatten().tolist() == [2]  # only EOS left
        assert g.accept(2) and g.is_terminated
        g.rollback(1)  # e.g. a rejected speculative token
        assert not g.is_terminated
        g.rollback(len(ids) - 1)
        g.fill_bitmask(bitmask, 0)
        assert not torch.equal(bitmask, before)
        assert not g.accept(tok.encode("hello", add_special_tokens=False)[0])
    finally:
        pool.shutdown()
