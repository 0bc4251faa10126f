"""Score templates (vLLM's: ``LLM.score(chat_template=...)``, ``--chat-template`` at the server):
an LLM reranker's pair rendered over the roles ``query`` and ``document``. The shipped
Qwen3-Reranker template renders the model card's prompt to the character; through a tiny
from-token reranker the scores equal HF AutoModelForCausalLM's P(yes) of the rendered prompt,
offline and at /score and /rerank; a template that fails is a clear error (a 400)."""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest
import torch

from tessellm import LLM
from tessellm.config import EngineArgs
from tessellm.pooling.score import render_score_template
from tests.pooling.test_convert import causal_with_tokenizer, hf_last_logits  # noqa: F401 (fixture)

ATOL = 2e-5
TEMPLATE_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "score_templates",
                             "qwen3_reranker.jinja")
NO, YES = "the", "cat"  # two single tokens of the tiny vocabulary, as the reranker's answers
QUERY, DOCS = "what is a cat?", ["a small feline", "the quick brown fox"]
RERANKER = {"architectures": ["Qwen3ForSequenceClassification"], "classifier_from_token": [NO, YES],
            "is_original_qwen3_reranker": True}


def _template() -> str:
    with open(TEMPLATE_PATH, encoding="utf-8") as f:
        return f.read()


def _expected_scores(path: str, template: str) -> tuple[list[list[int]], torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    ids = [tok(render_score_template(tok, template, QUERY, d), add_special_tokens=False)["input_ids"]
           for d in DOCS]
    logits = hf_last_logits(path, ids)
    yes, no = tok.convert_tokens_to_ids(YES), tok.convert_tokens_to_ids(NO)
    return ids, torch.sigmoid(logits[:, yes] - logits[:, no])


def test_shipped_qwen3_reranker_template_is_the_model_cards_prompt(causal_with_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(causal_with_tokenizer("qwen3"))
    prefix = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
              "and the Instruct provided. Note that the answer can only be \"yes\" or \"no\"."
              "<|im_end|>\n<|im_start|>user\n")
    suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    instruction = "Given a web search query, retrieve relevant passages that answer the query"
    expected = prefix + f"<Instruct>: {instruction}\n<Query>: {QUERY}\n<Document>: {DOCS[0]}" + suffix
    assert render_score_template(tok, _template(), QUERY, DOCS[0]) == expected


def test_offline_score_with_template_equals_hf(causal_with_tokenizer):
    path = causal_with_tokenizer("qwen3")
    ids, expected = _expected_scores(path, _template())
    with LLM(path, device="cpu", num_kv_blocks=64, max_num_batched_tokens=64, hf_overrides=RERANKER) as llm:
        got = llm.score(QUERY, DOCS, chat_template=_template())
        plain = llm.score(QUERY, DOCS)  # no template: query + document as one text
        with pytest.raises(ValueError, match="score template failed"):
            llm.score(QUERY, DOCS, chat_template="{{ messages[0].content | no_such_filter }}")
    assert [s.prompt_token_ids for s in got] == ids
    torch.testing.assert_close(torch.tensor([s.outputs.score for s in got]), expected, atol=ATOL, rtol=0)
    assert [len(s.prompt_token_ids) for s in plain] != [len(i) for i in ids]


def test_template_on_an_embedding_model_is_refused(bare_model_dir):
    with LLM(bare_model_dir("qwen3"), device="cpu", num_kv_blocks=32) as llm:
        with pytest.raises(ValueError, match="formats a cross-encoder's pair"):
            llm.score("a", ["b"], chat_template=_template())


def test_server_scores_with_chat_template(causal_with_tokenizer):
    from tessellm.entrypoints.async_llm import AsyncLLM
    from tessellm.entrypoints.openai.api_server import build_app
    from tessellm.entrypoints.openai.server_config import ServerConfig

    path = causal_with_tokenizer("qwen3")
    _, expected = _expected_scores(path, _template())

    async def run(template: str):
        engine = AsyncLLM(EngineArgs(model=path, device="cpu", num_kv_blocks=64, max_num_batched_tokens=64,
                                     hf_overrides=RERANKER))
        try:
            engine.start()
            app = build_app(engine, ServerConfig(["m"], chat_template=template))
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                         timeout=120) as c:
                return (await c.post("/score", json={"text_1": QUERY, "text_2": DOCS}),
                        await c.post("/rerank", json={"query": QUERY, "documents": DOCS}))
        finally:
            await engine.shutdown()

    score, rerank = asyncio.run(run(_template()))
    assert score.status_code == 200, score.text
    torch.testing.assert_close(torch.tensor([d["score"] for d in score.json()["data"]]), expected,
                               atol=ATOL, rtol=0)
    results = rerank.json()["results"]
    assert [r["index"] for r in results] == sorted(range(2), key=lambda i: -float(expected[i]))
    torch.testing.assert_close(torch.tensor([r["relevance_score"] for r in results]),
                               expected[[r["index"] for r in results]], atol=ATOL, rtol=0)
    bad, _ = asyncio.run(run("{{ messages[0].content | no_such_filter }}"))
    assert bad.status_code == 400 and "score template failed" in bad.json()["error"]["message"], bad.text
