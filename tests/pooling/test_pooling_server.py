"""POST /pooling in process (the app over a real AsyncLLM and engine core process): vLLM's
shape, ``task`` picking one vector or one row per prompt token, on an embedding model and on a
classifier, each equal to HF transformers in float32; bad input is a 400 naming the field, and
the server goes on serving."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest
import torch

from tests.pooling.conftest import hf_embeddings
from tests.pooling.test_embeddings_server import _args, _ids, _serve
from tests.pooling.test_token_pooling import hf_token_hidden, hf_token_logits

ATOL = 2e-5
TEXTS = ["the cat sat on the mat", "a query about embeddings"]


def _data(r) -> list:
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["id"].startswith("pool-") and body["model"] == "m"
    assert [d["index"] for d in body["data"]] == list(range(len(body["data"])))
    assert all(d["object"] == "pooling" for d in body["data"])
    return [torch.tensor(d["data"]) for d in body["data"]]


@pytest.fixture(scope="module")
def embed_served(embedding_model_dir):
    long_ids = list(range(3, 303)) * 2  # 600 tokens: over max_model_len 512

    async def scenario(c, _transport, _engine):
        post = lambda body: c.post("/pooling", json=body)  # noqa: E731
        r = {"default": await post({"model": "m", "input": TEXTS}),
             "tokens": await post({"input": TEXTS, "task": "token_embed"}),
             "b64": await post({"input": TEXTS, "task": "token_embed", "encoding_format": "base64"}),
             "raw16": await post({"input": [5, 6, 7, 8, 9], "task": "token_embed", "normalize": False,
                                  "dimensions": 16}),
             "chat": await post({"messages": [{"role": "user", "content": "the cat sat"}],
                                 "task": "token_embed"}),
             "truncated": await post({"input": long_ids, "task": "token_embed", "truncate_prompt_tokens": 7})}
        r["bad"] = {"classify": await post({"input": "x", "task": "token_classify"}),
                    "task": await post({"input": "x", "task": "token_max"}),
                    "activation": await post({"input": "x", "task": "token_embed", "use_activation": False}),
                    "dims": await post({"input": "x", "task": "token_embed", "dimensions": 65}),
                    "too_long": await post({"input": long_ids, "task": "token_embed"}),
                    "unknown": await post({"input": "x", "top_k": 3})}
        r["after"] = await post({"input": TEXTS})
        return r

    return asyncio.run(_serve(_args(embedding_model_dir, runner="pooling"), scenario))


def test_default_task_is_the_models_embedding(embed_served, embedding_model_dir):
    ref = hf_embeddings(embedding_model_dir, _ids(embedding_model_dir, TEXTS), "LAST")
    torch.testing.assert_close(torch.stack(_data(embed_served["default"])), ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.stack(_data(embed_served["after"])), ref, atol=ATOL, rtol=0)


def test_token_embed_rows_equal_hf(embed_served, embedding_model_dir):
    path = embedding_model_dir
    ids = _ids(path, TEXTS)
    got = _data(embed_served["tokens"])
    assert embed_served["tokens"].json()["usage"]["prompt_tokens"] == sum(map(len, ids))
    for rows, p in zip(got, ids):
        assert rows.shape == (len(p), 64)
        torch.testing.assert_close(rows, torch.nn.functional.normalize(hf_token_hidden(path, p), dim=-1),
                                   atol=ATOL, rtol=0)
    for d, rows in zip(embed_served["b64"].json()["data"], got):  # base64: the rows' float32 bytes
        decoded = np.frombuffer(base64.b64decode(d["data"]), dtype="<f4").reshape(rows.shape)
        assert decoded.tolist() == rows.tolist()
    raw = _data(embed_served["raw16"])[0]
    torch.testing.assert_close(raw, hf_token_hidden(path, [5, 6, 7, 8, 9])[:, :16], atol=ATOL, rtol=0)
    long_ids = list(range(3, 303)) * 2
    torch.testing.assert_close(_data(embed_served["truncated"])[0],
                               torch.nn.functional.normalize(hf_token_hidden(path, long_ids[:7]), dim=-1),
                               atol=ATOL, rtol=0)
    assert _data(embed_served["chat"])[0].shape[1] == 64


@pytest.mark.parametrize("name,param,words", [
    ("classify", "task", "embedding model: it does not token_classify"),
    ("task", "task", "should be 'embed', 'classify', 'token_embed' or 'token_classify'"),
    ("activation", "use_activation", "use_activation applies to a classification model"),
    ("dims", "dimensions", "more than this model's embedding size 64"),
    ("too_long", "input", "maximum context length"),
    ("unknown", "top_k", "Unrecognized request argument"),
])
def test_bad_input_is_a_400_naming_it(embed_served, name, param, words):
    r = embed_served["bad"][name]
    assert r.status_code == 400, (name, r.text)
    err = r.json()["error"]
    assert err["param"] == param and words.lower() in err["message"].lower(), err


def test_token_classify_on_a_classifier_server(classifier_dir):
    path = classifier_dir("qwen3", 3)
    ids = _ids(path, TEXTS)

    async def scenario(c, _transport, _engine):
        post = lambda body: c.post("/pooling", json=body)  # noqa: E731
        return {"default": await post({"input": TEXTS}),
                "tokens": await post({"input": TEXTS, "task": "token_classify"}),
                "logits": await post({"input": TEXTS[0], "task": "token_classify", "use_activation": False}),
                "embed": await post({"input": "x", "task": "token_embed"}),
                "dims": await post({"input": "x", "dimensions": 2})}

    r = asyncio.run(_serve(_args(path), scenario))
    for rows, probs, p in zip(_data(r["tokens"]), _data(r["default"]), ids):
        ref = hf_token_logits(path, p)
        torch.testing.assert_close(rows, torch.softmax(ref, dim=-1), atol=ATOL, rtol=0)
        torch.testing.assert_close(probs, torch.softmax(ref[-1], dim=-1), atol=ATOL, rtol=0)
    torch.testing.assert_close(_data(r["logits"])[0], hf_token_logits(path, ids[0]), atol=ATOL, rtol=0)
    for name, param, words in (("embed", "task", "classifier"), ("dims", "dimensions", "applies to embeddings")):
        assert r[name].status_code == 400 and r[name].json()["error"]["param"] == param, r[name].text
        assert words in r[name].json()["error"]["message"]


def test_pooling_on_a_generating_server_is_a_400(tiny_model_dir):
    async def scenario(c, _transport, _engine):
        return await c.post("/pooling", json={"input": [5, 6, 7], "task": "token_embed"})

    r = asyncio.run(_serve(_args(tiny_model_dir("qwen3")), scenario))
    assert r.status_code == 400 and "runner='pooling'" in r.json()["error"]["message"]
