"""Encoder models over HTTP, in process (the app over a real AsyncLLM and engine core process):
a tiny BERT embedding model's /v1/embeddings equal HF's CLS vectors of the tokenizer's ids
([CLS] text [SEP]); a tiny BERT cross-encoder's /score and /rerank equal HF's sigmoid of the
pair's logit with its token types, rerank ordered by it; a prompt over the context is a 400
naming it, and the server goes on serving."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tessellm.config import EngineArgs
from tests.pooling.encoder_models import hf_hidden, hf_pair_logits, make_encoder
from tests.pooling.test_embeddings_server import _serve

ATOL = 1e-5
QUERY = "what is a cat"
DOCS = ["a small feline", "the quick brown fox", "jumps over the lazy dog"]


def _args(path: str) -> EngineArgs:
    return EngineArgs(model=path, device="cpu", num_kv_blocks=64)  # max_model_len 128 (the model's)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny-encoders-server"))


def _ok(r):
    assert r.status_code == 200, r.text
    return r.json()


def test_embeddings_endpoint_equals_hf(root):
    from transformers import AutoTokenizer

    path = make_encoder(root, "bert")

    async def scenario(c, _transport, _engine):
        return {"embed": await c.post("/v1/embeddings", json={"model": "m", "input": DOCS}),
                "too_long": await c.post("/v1/embeddings", json={"input": "the cat " * 200}),
                "after": await c.post("/v1/embeddings", json={"input": DOCS[0]})}

    r = asyncio.run(_serve(_args(path), scenario))
    tok = AutoTokenizer.from_pretrained(path)
    ids = [tok(d)["input_ids"] for d in DOCS]
    want = torch.stack([torch.nn.functional.normalize(hf_hidden(path, p)[0], dim=-1) for p in ids])
    body = _ok(r["embed"])
    torch.testing.assert_close(torch.tensor([d["embedding"] for d in body["data"]]), want, atol=ATOL, rtol=0)
    assert body["usage"]["prompt_tokens"] == sum(map(len, ids))
    assert r["too_long"].status_code == 400 and "context length" in r["too_long"].json()["error"]["message"]
    torch.testing.assert_close(torch.tensor(_ok(r["after"])["data"][0]["embedding"]), want[0], atol=ATOL, rtol=0)


def test_score_and_rerank_equal_hf(root):
    path = make_encoder(root, "bert", num_labels=1)

    async def scenario(c, _transport, _engine):
        return {"score": await c.post("/score", json={"text_1": QUERY, "text_2": DOCS}),
                "rerank": await c.post("/rerank", json={"query": QUERY, "documents": DOCS})}

    r = asyncio.run(_serve(_args(path), scenario))
    want = torch.sigmoid(hf_pair_logits(path, [(QUERY, d) for d in DOCS])[:, 0])
    scores = torch.tensor([d["score"] for d in _ok(r["score"])["data"]])
    torch.testing.assert_close(scores, want, atol=ATOL, rtol=0)
    order = torch.argsort(want, descending=True).tolist()
    results = _ok(r["rerank"])["results"]
    assert [x["index"] for x in results] == order
    torch.testing.assert_close(torch.tensor([x["relevance_score"] for x in results]), want[order],
                               atol=ATOL, rtol=0)
