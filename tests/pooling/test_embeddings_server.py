"""POST /v1/embeddings in process (the app over a real AsyncLLM and engine core process) on a
tiny bare Qwen3Model with a tokenizer: every input shape equals HF AutoModel's pooled hidden
state, base64 decodes to the float list, dimensions renormalize, messages go through the chat
template, truncation keeps the first tokens (vLLM's pooling side); bad input is a 400 naming the
field and the server goes on serving; the OpenAI SDK's embeddings.create reads it; generation on a pooling server
and embeddings on a generating server are 400s naming the runner."""

from __future__ import annotations

import asyncio
import base64

import httpx
import numpy as np
import pytest
import torch

from tessellm.config import EngineArgs
from tessellm.core.sampling_params import SamplingParams
from tests.pooling.conftest import hf_embeddings

ATOL = 2e-5
TEXTS = ["the cat sat on the mat", "a query about embeddings", "The quick brown fox"]
LONG_TEXT = "the cat sat on the mat. " + "a query about embeddings " * 300  # over the context


def _args(path: str, **kwargs) -> EngineArgs:
    return EngineArgs(model=path, device="cpu", num_kv_blocks=64, max_num_batched_tokens=32,
                      max_model_len=512, **kwargs)


async def _serve(args: EngineArgs, scenario):
    from tessellm.entrypoints.async_llm import AsyncLLM
    from tessellm.entrypoints.openai.api_server import build_app
    from tessellm.entrypoints.openai.server_config import ServerConfig

    engine = AsyncLLM(args)
    try:
        engine.start()
        app = build_app(engine, ServerConfig(["m"]))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=120) as c:
            return await scenario(c, transport, engine)
    finally:
        await engine.shutdown()


def _vectors(r) -> torch.Tensor:
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["index"] for d in body["data"]] == list(range(len(body["data"])))
    return torch.tensor([d["embedding"] for d in body["data"]])


@pytest.fixture(scope="module")
def served(embedding_model_dir):
    """One server, every request; the responses by name."""
    import openai

    long_ids = list(range(3, 303)) * 2  # 600 tokens: over max_model_len 512

    async def scenario(c, transport, engine):
        post = lambda body: c.post("/v1/embeddings", json=body)  # noqa: E731
        r = {"one": await post({"model": "m", "input": TEXTS[0]}),
             "many": await post({"input": TEXTS}),
             "ids": await post({"input": [5, 6, 7, 8]}),
             "id_lists": await post({"input": [[5, 6, 7, 8], [9, 10]]}),
             "b64": await post({"input": TEXTS, "encoding_format": "base64"}),
             "dims": await post({"input": TEXTS, "dimensions": 16}),
             "raw": await post({"input": TEXTS, "normalize": False}),
             "chat": await post({"messages": [{"role": "user", "content": "the cat sat"},
                                              {"role": "assistant", "content": "on the mat"}]}),
             "truncated": await post({"input": long_ids, "truncate_prompt_tokens": 5}),
             "truncated_text": await post({"input": LONG_TEXT, "truncate_prompt_tokens": 6}),
             "hundred": await post({"input": [[5, 6, 7]] * 100}),  # over --max-prompts (64)
             "models": await c.get("/v1/models")}
        r["bad"] = {
            "dims_over": await post({"input": "x", "dimensions": 65}),
            "dims_zero": await post({"input": "x", "dimensions": 0}),
            "too_long": await post({"input": long_ids}),
            "too_long_text": await post({"input": ["the cat", "the cat sat " * 400]}),
            "empty_list": await post({"input": []}),
            "too_many": await post({"input": [[5]] * 2049}),
            "empty_text": await post({"input": ""}),
            "bad_id": await post({"input": [5, 100000]}),
            "format": await post({"input": "x", "encoding_format": "bytes"}),
            "unknown": await post({"input": "x", "temperature": 0.5}),
            "no_input": await post({"model": "m"}),
            "model": await post({"model": "other", "input": "x"}),
            "completions": await c.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 2}),
            "chat": await c.post("/v1/chat/completions",
                                 json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
        }
        r["after"] = await post({"input": TEXTS[0]})
        try:  # the Python API: a generate request to an embedding engine is refused, not run
            engine.add_request("gen", {"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=4))
        except ValueError as exc:
            r["api_generate"] = str(exc)
        sdk = openai.AsyncOpenAI(base_url="http://t/v1", api_key="none", max_retries=0,
                                 http_client=httpx.AsyncClient(transport=transport, base_url="http://t"))
        r["sdk"] = await sdk.embeddings.create(model="m", input=TEXTS)  # base64 on the wire
        r["sdk_dims"] = await sdk.embeddings.create(model="m", input=TEXTS[1], dimensions=8,
                                                    encoding_format="float")
        return r

    return asyncio.run(_serve(_args(embedding_model_dir, runner="pooling"), scenario))


def _ids(path, texts):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return [tok.encode(t) for t in texts]


def test_inputs_equal_hf(served, embedding_model_dir):
    path = embedding_model_dir
    ids = _ids(path, TEXTS)
    ref = hf_embeddings(path, ids, "LAST")
    one = served["one"].json()
    assert one["object"] == "list" and one["model"] == "m" and one["id"].startswith("embd-")
    assert one["data"][0]["object"] == "embedding"
    assert one["usage"]["prompt_tokens"] == one["usage"]["total_tokens"] == len(ids[0])
    torch.testing.assert_close(_vectors(served["one"])[0], ref[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(_vectors(served["many"]), ref, atol=ATOL, rtol=0)
    assert served["many"].json()["usage"]["prompt_tokens"] == sum(map(len, ids))
    torch.testing.assert_close(_vectors(served["ids"]), hf_embeddings(path, [[5, 6, 7, 8]], "LAST"),
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(_vectors(served["id_lists"]),
                               hf_embeddings(path, [[5, 6, 7, 8], [9, 10]], "LAST"), atol=ATOL, rtol=0)


def test_a_hundred_inputs_in_one_request(served, embedding_model_dir):
    got = _vectors(served["hundred"])
    assert got.shape == (100, 64) and served["hundred"].json()["usage"]["prompt_tokens"] == 300
    ref = hf_embeddings(embedding_model_dir, [[5, 6, 7]], "LAST")
    torch.testing.assert_close(got, ref.expand(100, -1), atol=ATOL, rtol=0)


def test_base64_decodes_to_the_float_list(served):
    floats = served["many"].json()["data"]
    for d, f in zip(served["b64"].json()["data"], floats):
        decoded = np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
        assert decoded.tolist() == f["embedding"]


def test_dimensions_truncate_then_renormalize(served):
    dims, raw = _vectors(served["dims"]), _vectors(served["raw"])
    assert dims.shape == (3, 16)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3), atol=1e-3)  # really unnormalized
    torch.testing.assert_close(dims, torch.nn.functional.normalize(raw[:, :16], dim=-1), atol=ATOL, rtol=0)


def test_messages_and_truncation(served, embedding_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedding_model_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "the cat sat"},
                                   {"role": "assistant", "content": "on the mat"}],
                                  add_generation_prompt=False, tokenize=True)
    ids = list(ids["input_ids"]) if isinstance(ids, dict) or hasattr(ids, "keys") else list(ids)
    torch.testing.assert_close(_vectors(served["chat"])[0], hf_embeddings(embedding_model_dir, [ids], "LAST")[0],
                               atol=ATOL, rtol=0)
    long_ids = list(range(3, 303)) * 2
    assert served["truncated"].json()["usage"]["prompt_tokens"] == 5
    torch.testing.assert_close(_vectors(served["truncated"])[0],
                               hf_embeddings(embedding_model_dir, [long_ids[:5]], "LAST")[0], atol=ATOL, rtol=0)
    # a text: what HF's tokenizer keeps with vLLM's pooling side (truncation_side="right")
    right = AutoTokenizer.from_pretrained(embedding_model_dir, truncation_side="right")
    first = list(right(LONG_TEXT, truncation=True, max_length=6)["input_ids"])
    assert first != right.encode(LONG_TEXT)[-6:]
    assert served["truncated_text"].json()["usage"]["prompt_tokens"] == 6
    torch.testing.assert_close(_vectors(served["truncated_text"])[0],
                               hf_embeddings(embedding_model_dir, [first], "LAST")[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name,param,words", [
    ("dims_over", "dimensions", "more than this model's embedding size 64"),
    ("dims_zero", "dimensions", "dimensions"),
    ("too_long", "input", "maximum context length"),
    ("too_long_text", "input", "input 1:"),
    ("empty_list", "input", "input is empty"),
    ("too_many", "input", "2049 inputs, over the limit of 2048"),
    ("empty_text", "input", "empty"),
    ("bad_id", "input", "token ids must be integers"),
    ("format", "encoding_format", "encoding_format"),
    ("unknown", "temperature", "Unrecognized request argument"),
    ("no_input", "input", "Missing required parameter"),
    ("completions", None, "runner='pooling'"),
    ("chat", None, "does not generate text"),
])
def test_bad_input_is_a_400_naming_it(served, name, param, words):
    r = served["bad"][name]
    assert r.status_code == 400, (name, r.text)
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert words.lower() in err["message"].lower(), err["message"]
    if name.startswith("too_long"):
        assert err["code"] == "context_length_exceeded"


def test_unknown_model_is_404_and_server_keeps_serving(served):
    assert served["bad"]["model"].status_code == 404
    torch.testing.assert_close(_vectors(served["after"]), _vectors(served["one"]), atol=0, rtol=0)
    models = served["models"].json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["m"]


def test_generate_through_the_python_api_is_refused(served):
    assert "does not generate text" in served.get("api_generate", "")


def test_openai_sdk_embeddings(served):
    floats = _vectors(served["many"])
    got = torch.tensor([d.embedding for d in served["sdk"].data])
    torch.testing.assert_close(got, floats, atol=0, rtol=0)  # base64 float32 == the float list
    assert served["sdk"].usage.prompt_tokens == served["many"].json()["usage"]["prompt_tokens"]
    assert len(served["sdk_dims"].data[0].embedding) == 8


def test_embeddings_on_a_generating_server_is_a_400(tiny_model_dir):
    async def scenario(c, _transport, _engine):
        return (await c.post("/v1/embeddings", json={"input": [5, 6, 7]}),
                await c.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 2}))

    emb, comp = asyncio.run(_serve(_args(tiny_model_dir("qwen3")), scenario))
    assert emb.status_code == 400 and "runner='pooling'" in emb.json()["error"]["message"]
    assert comp.status_code == 200
