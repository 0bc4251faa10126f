"""A grammar that fails to compile inside the engine (after the front end's checks passed, as
xgrammar allows: converting a schema to a grammar is a subset of compiling it against the
vocabulary) ends that request alone, with a reason naming the problem; the server turns that
reason into a 400 (``AsyncLLM._core_refusal``, as for an adapter that fails to load). No spec
that xgrammar 0.2.9 accepts at conversion and refuses at compile is known, so the compiler's
failure is injected: the engine, the model and the other requests are real."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams
from tessellm.structured_output import StructuredOutputsParams as S

pytest.importorskip("xgrammar")

BROKEN = "z{3}q"  # the regex whose compile fails below


class _FailingCompiler:
    """xgrammar's compiler, except that it raises as xgrammar does for one grammar."""

    def __init__(self, compiler):
        self.compiler = compiler

    def compile_grammar(self, grammar):
        if '"z"' in str(grammar) and '"q"' in str(grammar):
            raise RuntimeError("[07:00:00] /project/cpp/grammar_compiler.cc:99: token mask cache failed")
        return self.compiler.compile_grammar(grammar)


@pytest.fixture(scope="module")
def llm():
    with LLM(max_model_len=256, num_kv_blocks=64, block_size=16) as engine:
        yield engine


def test_failed_compile_ends_that_request_with_a_reason(llm):
    params = lambda so: SamplingParams(temperature=0, max_tokens=6, structured_outputs=so)  # noqa: E731
    prompts = ["Give me a code.", "Pick a letter.", "The capital of France is"]
    alone = llm.generate(prompts[2], params(None), use_tqdm=False)[0].outputs[0].token_ids
    pool = llm.engine.core.structured.pool
    pool._compiler = _FailingCompiler(pool._compiler)
    outs = llm.generate(prompts, [params(S(regex=BROKEN)), params(S(regex="[ab]{3}")), params(None)],
                        use_tqdm=False)
    broken, fine, plain = (o.outputs[0] for o in outs)
    assert broken.finish_reason == "abort" and broken.token_ids == []
    assert isinstance(broken.stop_reason, str) and "token mask cache failed" in broken.stop_reason
    assert "structured_outputs" in broken.stop_reason and ".cc:" not in broken.stop_reason
    assert fine.text in {a + b + c for a in "ab" for b in "ab" for c in "ab"}
    assert plain.token_ids == alone  # its neighbours' failure changed nothing
    assert not llm.engine.has_unfinished_requests()
