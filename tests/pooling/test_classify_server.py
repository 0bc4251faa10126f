"""POST /classify, /score (/v1/score) and /rerank (/v1/rerank, /v2/rerank) in process (the app over
a real AsyncLLM and engine core process): a one-label Qwen2 cross-encoder's probabilities and
scores equal HF's sigmoid of the pair's logit, rerank orders by it and honours top_n and
return_documents, an embedding model's /score is HF's cosine; bad input is a 400 with an
OpenAI error object naming the field, and the server goes on serving."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tests.pooling.conftest import hf_embeddings, hf_logits
from tests.pooling.test_embeddings_server import _args, _serve

ATOL = 2e-5
QUERY = "a query about vectors"
DOCS = ["the cat sat on the mat", "embeddings and vectors", "The quick brown fox"]
CHAT = [{"role": "user", "content": "the cat sat"}, {"role": "assistant", "content": "on the mat"}]


@pytest.fixture(scope="module")
def cross(classifier_dir):
    path = classifier_dir("qwen2", 1)

    async def scenario(c, _transport, _engine):
        post = c.post
        r = {"classify": await post("/classify", json={"model": "m", "input": DOCS}),
             "classify_chat": await post("/classify", json={"messages": CHAT}),
             "classify_raw": await post("/classify", json={"input": DOCS[0], "use_activation": False}),
             "score": await post("/score", json={"model": "m", "text_1": QUERY, "text_2": DOCS}),
             "score_v1": await post("/v1/score", json={"text_1": [QUERY] * 3, "text_2": DOCS}),
             "rerank": await post("/rerank", json={"query": QUERY, "documents": DOCS}),
             "rerank_top": await post("/v1/rerank", json={"query": QUERY, "documents": DOCS, "top_n": 2,
                                                          "return_documents": False}),
             "rerank_v2": await post("/v2/rerank", json={"query": QUERY, "documents": DOCS}),
             "truncated": await post("/score", json={"text_1": QUERY, "text_2": "the cat sat " * 400,
                                                     "truncate_prompt_tokens": 12})}
        r["bad"] = {
            "lengths": await post("/score", json={"text_1": [QUERY, QUERY], "text_2": DOCS}),
            "empty_docs": await post("/rerank", json={"query": QUERY, "documents": []}),
            "empty_doc": await post("/rerank", json={"query": QUERY, "documents": ["x", ""]}),
            "empty_input": await post("/classify", json={"input": []}),
            "dimensions": await post("/classify", json={"input": "x", "dimensions": 2}),
            "top_n": await post("/rerank", json={"query": QUERY, "documents": DOCS, "top_n": -1}),
            "too_long": await post("/score", json={"text_1": QUERY, "text_2": "the cat sat " * 400}),
            "embeddings": await post("/v1/embeddings", json={"input": "x"}),
            "model": await post("/score", json={"model": "other", "text_1": "a", "text_2": "b"}),
            "completions": await post("/v1/completions", json={"prompt": "the cat", "max_tokens": 2}),
        }
        r["after"] = await post("/score", json={"text_1": QUERY, "text_2": DOCS[0]})
        return r

    return path, asyncio.run(_serve(_args(path), scenario))  # runner auto: a classifier pools


def _pairs(path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return [tok(text=QUERY, text_pair=d)["input_ids"] for d in DOCS], [tok.encode(d) for d in DOCS]


def _ok(r):
    assert r.status_code == 200, r.text
    return r.json()


def test_classify_matches_hf(cross):
    path, r = cross
    _, singles = _pairs(path)
    logits = hf_logits(path, singles)[:, 0]
    body = _ok(r["classify"])
    assert [(d["index"], d["label"], d["num_classes"]) for d in body["data"]] == [(i, "class_a", 1) for i in range(3)]
    torch.testing.assert_close(torch.tensor([d["probs"][0] for d in body["data"]]), torch.sigmoid(logits),
                               atol=ATOL, rtol=0)
    assert body["usage"]["prompt_tokens"] == sum(map(len, singles))
    torch.testing.assert_close(torch.tensor(_ok(r["classify_raw"])["data"][0]["probs"]), logits[:1],
                               atol=ATOL, rtol=0)


def test_classify_chat_messages_go_through_the_template(cross):
    from transformers import AutoTokenizer

    path, r = cross
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.encode(tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=False),
                     add_special_tokens=False)
    body = _ok(r["classify_chat"])
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert body["data"][0]["probs"][0] == pytest.approx(float(torch.sigmoid(hf_logits(path, [ids])[0, 0])), abs=ATOL)


def test_score_and_rerank_match_hf(cross):
    path, r = cross
    pairs, _ = _pairs(path)
    want = torch.sigmoid(hf_logits(path, pairs)[:, 0])
    for name in ("score", "score_v1"):
        body = _ok(r[name])
        assert [(d["index"], d["object"]) for d in body["data"]] == [(i, "score") for i in range(3)]
        torch.testing.assert_close(torch.tensor([d["score"] for d in body["data"]]), want, atol=ATOL, rtol=0)
        assert body["usage"]["prompt_tokens"] == sum(map(len, pairs))
        assert body["id"].startswith("score-")
    order = torch.argsort(want, descending=True).tolist()
    for name in ("rerank", "rerank_v2"):
        body = _ok(r[name])
        assert [x["index"] for x in body["results"]] == order
        assert [x["document"]["text"] for x in body["results"]] == [DOCS[i] for i in order]
        torch.testing.assert_close(torch.tensor([x["relevance_score"] for x in body["results"]]),
                                   want[order], atol=ATOL, rtol=0)
        assert body["usage"]["total_tokens"] == sum(map(len, pairs))
        assert body["id"].startswith("rerank-"), body["id"]  # vLLM's prefix (docs/pooling.md)
    top = _ok(r["rerank_top"])["results"]
    assert [x["index"] for x in top] == order[:2] and all(x["document"] is None for x in top)
    assert _ok(r["after"])["data"][0]["score"] == pytest.approx(float(want[0]), abs=ATOL)


def test_score_truncates_the_pair_as_the_tokenizer_does(cross):
    from transformers import AutoTokenizer

    path, r = cross
    ids = AutoTokenizer.from_pretrained(path)(text=QUERY, text_pair="the cat sat " * 400, truncation=True,
                                              max_length=12)["input_ids"]
    body = _ok(r["truncated"])
    assert body["usage"]["prompt_tokens"] == 12
    assert body["data"][0]["score"] == pytest.approx(float(torch.sigmoid(hf_logits(path, [ids])[0, 0])), abs=ATOL)


@pytest.mark.parametrize("name, param, words", [
    ("lengths", "text_2", "text_1 has 2 texts and text_2 has 3"),
    ("empty_docs", "documents", "documents is empty"),
    ("empty_doc", "documents", "documents[1] is an empty string"),
    ("empty_input", "input", "input is empty"),
    ("dimensions", "dimensions", "dimensions"),
    ("top_n", "top_n", "top_n"),
    ("too_long", "text_2", "context"),
    ("embeddings", None, "sequence classifier"),
    ("completions", None, "sequence classifier"),
])
def test_bad_input_is_a_400_naming_it(cross, name, param, words):
    r = cross[1]["bad"][name]
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param


def test_unknown_model_is_404(cross):
    assert cross[1]["bad"]["model"].status_code == 404


def test_embedding_model_scores_by_cosine(embedding_model_dir):
    from transformers import AutoTokenizer

    async def scenario(c, _transport, _engine):
        return {"score": await c.post("/score", json={"text_1": QUERY, "text_2": DOCS}),
                "rerank": await c.post("/rerank", json={"query": QUERY, "documents": DOCS, "top_n": 1}),
                "classify": await c.post("/classify", json={"input": "x"}),
                "activation": await c.post("/score", json={"text_1": "a", "text_2": "b", "use_activation": True})}

    r = asyncio.run(_serve(_args(embedding_model_dir, runner="pooling"), scenario))
    tok = AutoTokenizer.from_pretrained(embedding_model_dir)
    ref = hf_embeddings(embedding_model_dir, [tok.encode(t) for t in [QUERY] + DOCS], "LAST")
    want = torch.nn.functional.cosine_similarity(ref[:1], ref[1:])
    torch.testing.assert_close(torch.tensor([d["score"] for d in _ok(r["score"])["data"]]), want,
                               atol=ATOL, rtol=0)
    assert [x["index"] for x in _ok(r["rerank"])["results"]] == [int(torch.argmax(want))]
    for name, words in (("classify", "embedding model: it does not classify"), ("activation", "use_activation")):
        assert r[name].status_code == 400 and words in r[name].json()["error"]["message"], r[name].text


def test_generating_server_refuses_classify_score_and_rerank(tiny_model_dir):
    async def scenario(c, _transport, _engine):
        return [await c.post("/classify", json={"input": [5, 6, 7]}),
                await c.post("/score", json={"text_1": "a", "text_2": "b"}),
                await c.post("/v1/rerank", json={"query": "a", "documents": ["b"]}),
                await c.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 2})]

    *refused, comp = asyncio.run(_serve(_args(tiny_model_dir("qwen3")), scenario))
    for r in refused:
        assert r.status_code == 400 and "runner='pooling'" in r.json()["error"]["message"], r.text
    assert comp.status_code == 200
