"""The token that stops a sample (EOS, a stop token id) is in ``token_ids`` but not in the text,
as in vLLM, unless ``include_stop_str_in_output``; with ``skip_special_tokens: false`` the text
used to end in "</s>". On the tiny bigram model whose greedy output is known token for token."""

from __future__ import annotations

import pytest

from tessellm import LLM
from tessellm.core.sampling_params import SamplingParams
from tests.server.thinking_model import make_thinking_model

FULL = "<think> Let me see. Two and two.</think> It is four."


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    engine = LLM(make_thinking_model(str(tmp_path_factory.mktemp("m"))), device="cpu", max_model_len=128)
    yield engine
    engine.shutdown()


def _gen(llm, **params):
    prompt = llm.get_tokenizer().encode("[think]", add_special_tokens=False)
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=20, temperature=0, **params),
                       use_tqdm=False)[0].outputs[0]
    return out.text, out.token_ids, out.finish_reason, out.stop_reason


def test_eos_is_not_text_even_with_special_tokens_kept(llm):
    text, ids, reason, stop = _gen(llm, skip_special_tokens=False)
    assert (text, ids[-1], reason, stop) == (FULL, 2, "stop", None)
    assert _gen(llm, skip_special_tokens=False, include_stop_str_in_output=True)[0] == FULL + "</s>"
    assert _gen(llm)[0] == FULL


def test_stop_token_id_is_not_text(llm):
    four = llm.get_tokenizer().convert_tokens_to_ids(" four.")
    text, ids, reason, stop = _gen(llm, stop_token_ids=[four])
    assert (text, ids[-1], reason, stop) == (FULL[:-len(" four.")], four, "stop", four)
    assert _gen(llm, stop_token_ids=[four], include_stop_str_in_output=True)[0] == FULL
