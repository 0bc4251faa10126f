"""LoRA at the OpenAI server: adapters listed with their parent, selected by ``model``, loaded
and unloaded at run time; unknown names are 404, bad adapters 400, and the server keeps serving."""

from __future__ import annotations

import json
import os

import httpx
import pytest
from safetensors.torch import load_file, save_file

from tests.lora.adapters import peft_greedy, write_random_adapter
from tests.server.conftest import start_server, stop_server

PROMPT = [5, 17, 200, 33, 8, 91, 4]
MAX_NEW = 6


@pytest.fixture(scope="module")
def lora_server(lora_setup):
    model, paths = lora_setup
    srv = start_server([model, "--dtype", "float32", "--enable-lora", "--max-loras", "1",
                        "--max-lora-rank", "32", "--max-model-len", "256",
                        "--lora-modules", f"qv8={paths['qv8']}", "--allow-runtime-lora-updating",
                        "--no-kernel-warmup"])
    yield srv, model, paths
    stop_server(srv)


def _tokens(http: httpx.Client, model: str) -> list[int]:
    r = http.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": MAX_NEW,
                                           "temperature": 0, "logprobs": 1, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return [int(t.strip("<>")) for t in r.json()["choices"][0]["logprobs"]["tokens"]]


def test_lora_server(lora_server, tmp_path):
    srv, model, paths = lora_server
    with httpx.Client(base_url=srv.url, headers=srv.headers, timeout=120) as http:
        cards = {c["id"]: c for c in http.get("/v1/models").json()["data"]}
        base = next(n for n, c in cards.items() if c.get("parent") is None)
        assert cards["qv8"]["parent"] == base and cards["qv8"]["root"] == paths["qv8"]

        assert _tokens(http, "qv8") == peft_greedy(model, paths["qv8"], [PROMPT], MAX_NEW)[0]
        r = http.post("/v1/completions", json={"model": "nope", "prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"

        # A corrupt adapter and a mismatched one: 400 naming the problem, nothing registered.
        corrupt = tmp_path / "corrupt"
        corrupt.mkdir()
        config_path = os.path.join(paths["all32"], "adapter_config.json")
        (corrupt / "adapter_config.json").write_text(open(config_path).read())
        (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00not safetensors")
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(corrupt)})
        assert r.status_code == 400 and "corrupt" in r.json()["error"]["message"]
        dora = tmp_path / "dora"
        dora.mkdir()
        config = json.load(open(config_path))
        (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(dora)})
        assert r.status_code == 400 and "DoRA" in r.json()["error"]["message"]
        fused = tmp_path / "fused"  # a Phi-3 style module the Llama family lacks
        fused.mkdir()
        (fused / "adapter_config.json").write_text(open(config_path).read())
        tensors = load_file(os.path.join(paths["all32"], "adapter_model.safetensors"))
        save_file({k.replace(".q_proj.", ".qkv_proj."): v for k, v in tensors.items()},
                  str(fused / "adapter_model.safetensors"))
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(fused)})
        message = r.json()["error"]["message"]
        assert r.status_code == 400 and "self_attn.qkv_proj" in message, message
        assert "supports q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in message
        wide = tmp_path / "wide"  # rank 64 on a server of --max-lora-rank 32
        write_random_adapter(str(wide), model, 64, ["q_proj"], 16, seed=1)
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(wide)})
        assert r.status_code == 400 and "--max-lora-rank 64" in r.json()["error"]["message"]
        assert "bad" not in {c["id"] for c in http.get("/v1/models").json()["data"]}

        # Load at run time: with one slot, requests for two adapters and the base all complete.
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "all32", "lora_path": paths["all32"]})
        assert r.status_code == 200, r.text
        assert _tokens(http, "all32") == peft_greedy(model, paths["all32"], [PROMPT], MAX_NEW)[0]
        assert _tokens(http, base) == peft_greedy(model, None, [PROMPT], MAX_NEW)[0]
        r = http.post("/v1/unload_lora_adapter", json={"lora_name": "all32"})
        assert r.status_code == 200
        r = http.post("/v1/completions", json={"model": "all32", "prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 404
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "all32"}).status_code == 404
    # The API key guards the adapter routes.
    r = httpx.post(f"{srv.url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp"})
    assert r.status_code == 401


@pytest.mark.slow
def test_runtime_updating_off_is_refused(lora_setup, server_factory):
    model, paths = lora_setup
    srv = server_factory([model, "--dtype", "float32", "--enable-lora", "--max-lora-rank", "32",
                          "--max-model-len", "256", "--no-kernel-warmup"])
    r = httpx.post(f"{srv.url}/v1/load_lora_adapter", headers=srv.headers,
                   json={"lora_name": "qv8", "lora_path": paths["qv8"]})
    assert r.status_code == 400 and "--allow-runtime-lora-updating" in r.json()["error"]["message"]


def test_unload_and_reload_while_a_request_streams(lora_server):
    """A streamed request for an adapter keeps it after the adapter is unloaded mid-stream and
    finishes with its tokens; new requests for the name are 404 (others, and unknown names,
    answered meanwhile); the name loaded again with other files serves the new files."""
    srv, model, paths = lora_server
    long = 160  # a while of decoding after the first token: the unload lands mid-stream
    with httpx.Client(base_url=srv.url, headers=srv.headers, timeout=120) as http:
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "swap", "lora_path": paths["all32"]})
        assert r.status_code == 200, r.text
        body = {"model": "swap", "prompt": PROMPT, "max_tokens": long, "temperature": 0,
                "logprobs": 1, "ignore_eos": True}
        r = http.post("/v1/completions", json=body)  # the reference: no unload meanwhile
        want = r.json()["choices"][0]["logprobs"]["tokens"]
        assert want[:MAX_NEW] == [f"<{t}>" for t in peft_greedy(model, paths["all32"], [PROMPT], MAX_NEW)[0]]
        body["stream"] = True
        tokens = []
        with http.stream("POST", "/v1/completions", json=body) as stream:
            lines = stream.iter_lines()
            for line in lines:  # the first token is out: the request runs
                if line.startswith("data: ") and line != "data: [DONE]":
                    tokens += json.loads(line[6:])["choices"][0]["logprobs"]["tokens"]
                    break
            with httpx.Client(base_url=srv.url, headers=srv.headers, timeout=120) as other:
                assert other.post("/v1/unload_lora_adapter", json={"lora_name": "swap"}).status_code == 200
                r = other.post("/v1/completions", json={"model": "swap", "prompt": PROMPT, "max_tokens": 2})
                assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
                r = other.post("/v1/completions", json={"model": "nope", "prompt": PROMPT, "max_tokens": 2})
                assert r.status_code == 404
            for line in lines:
                if line.startswith("data: ") and line != "data: [DONE]":
                    tokens += json.loads(line[6:])["choices"][0]["logprobs"]["tokens"]
        assert tokens == want
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "swap", "lora_path": paths["qv8"]})
        assert r.status_code == 200, r.text
        assert _tokens(http, "swap") == peft_greedy(model, paths["qv8"], [PROMPT], MAX_NEW)[0]
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "swap"}).status_code == 200



@pytest.mark.parametrize("route", ["completions", "chat"])
def test_adapter_resolved_when_the_request_arrives(lora_setup, monkeypatch, route):
    """An adapter unloaded while a request's prompt is being prepared (the handler awaits the
    tokenizer threads): the request keeps the adapter it named. It was looked up again after
    the await and, gone by then, the request ran on the base model under the adapter's name.
    What is checked is the handler: the engine here only records what it is handed."""
    import asyncio
    from types import SimpleNamespace

    import tessellm.entrypoints.openai.serving_chat as chat
    from tessellm.core.engine_core import EngineInfo
    from tessellm.core.input_processor import ProcessedPrompt
    from tessellm.entrypoints.openai.lora_modules import LoRAModules
    from tessellm.entrypoints.openai.server_config import ServerConfig
    from tessellm.entrypoints.openai.serving_completion import create_completion

    model, paths = lora_setup
    config = ServerConfig(["base"])
    config.lora = LoRAModules("base", model, 32, allow_runtime_updating=True)
    lora = config.lora.add("qv8", paths["qv8"])
    handed = []

    class Handed(Exception):
        pass

    def add_request(rid, prompt, params, event, lora_request, **_):  # (priority, ...)
        handed.append(lora_request)
        raise Handed

    async def unload_meanwhile(*args, **kwargs):  # the unload route runs during this await
        config.lora.remove("qv8")
        return [5, 6, 7]

    async def process_prompt_async(prompt):
        await unload_meanwhile()
        return ProcessedPrompt(None, prompt["prompt_token_ids"])

    info = EngineInfo(model, "dir", 256, 384, 64, 16, [2], "cpu", "float32")
    engine = SimpleNamespace(info=info, tokenizer=None, args=SimpleNamespace(reasoning_parser=None),
                             process_prompt_async=process_prompt_async, add_request=add_request,
                             process_prompt=lambda p: ProcessedPrompt(None, p["prompt_token_ids"]),
                             abort=lambda rid: None)
    body = {"model": "qv8", "max_tokens": 2}
    if route == "completions":
        call = create_completion(engine, config, {**body, "prompt": [5, 6, 7]}, None)
    else:
        monkeypatch.setattr(chat, "render_messages", unload_meanwhile)
        call = chat.create_chat_completion(engine, config, {**body, "messages": [
            {"role": "user", "content": "hi"}]}, None)
    with pytest.raises(Handed):
        asyncio.run(call)
    assert handed == [lora]


def test_adapter_that_fails_in_the_engine_is_an_error(lora_server, tmp_path):
    """The adapter's files vanish after the load route checked them: the engine cannot read it
    when a request first names it. The request is a 400 naming why (it was a 200 with an
    empty text and finish_reason "stop"), streamed or not; other requests go on."""
    import shutil

    srv, model, paths = lora_server
    gone = tmp_path / "gone"
    shutil.copytree(paths["qv8"], gone)
    with httpx.Client(base_url=srv.url, headers=srv.headers, timeout=120) as http:
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "gone", "lora_path": str(gone)})
        assert r.status_code == 200, r.text
        shutil.rmtree(gone)
        body = {"model": "gone", "prompt": PROMPT, "max_tokens": 4, "n": 2}
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 400 and "does not exist" in r.json()["error"]["message"], r.text
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as stream:
            events = [json.loads(line[6:]) for line in stream.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        assert "does not exist" in events[-1]["error"]["message"], events
        assert _tokens(http, "qv8") == peft_greedy(model, paths["qv8"], [PROMPT], MAX_NEW)[0]
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "gone"}).status_code == 200


def test_scoring_and_sampling_with_an_adapter(lora_server):
    """echo + max_tokens 0 (lm-eval-harness's loglikelihood) scores the prompt with the adapter
    (HF + peft's log-probabilities); n = 2 greedy streamed samples are the adapter's tokens."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    srv, model, paths = lora_server
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
                                   paths["qv8"]).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(input_ids=torch.tensor([PROMPT])).logits[0].float(), dim=-1)
    with httpx.Client(base_url=srv.url, headers=srv.headers, timeout=120) as http:
        r = http.post("/v1/completions", json={"model": "qv8", "prompt": PROMPT, "max_tokens": 0,
                                               "echo": True, "logprobs": 1})
        assert r.status_code == 200, r.text
        scored = r.json()["choices"][0]["logprobs"]["token_logprobs"]
        assert scored[0] is None and len(scored) == len(PROMPT)
        for j in range(1, len(PROMPT)):
            assert abs(scored[j] - ref[j - 1, PROMPT[j]].item()) < 1e-4, j
        body = {"model": "qv8", "prompt": PROMPT, "max_tokens": MAX_NEW, "temperature": 0, "n": 2,
                "logprobs": 1, "ignore_eos": True, "stream": True}
        tokens = {0: [], 1: []}
        with http.stream("POST", "/v1/completions", json=body) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    choice = json.loads(line[6:])["choices"][0]
                    tokens[choice["index"]] += [int(t.strip("<>")) for t in choice["logprobs"]["tokens"]]
    want = peft_greedy(model, paths["qv8"], [PROMPT], MAX_NEW)[0]
    assert tokens == {0: want, 1: want}


def test_reload_of_rewritten_files_under_the_same_name_serves_the_new_weights(lora_server, tmp_path):
    """Load A as "x" from a directory, request, unload; the directory is rewritten with B's
    files (a retrained adapter) and loaded as "x" again: the answers are B's, never A's cached
    weights (the core forgot A on unload, and the name gets a new id)."""
    import shutil

    srv, model, paths = lora_server
    x = tmp_path / "x"
    shutil.copytree(paths["all32"], x)
    with httpx.Client(base_url=srv.url, headers=srv.headers, timeout=120) as http:
        assert http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(x)}).status_code == 200
        assert _tokens(http, "x") == peft_greedy(model, paths["all32"], [PROMPT], MAX_NEW)[0]
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "x"}).status_code == 200
        shutil.rmtree(x)
        shutil.copytree(paths["qv8"], x)
        assert http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(x)}).status_code == 200
        assert _tokens(http, "x") == peft_greedy(model, paths["qv8"], [PROMPT], MAX_NEW)[0]
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "x"}).status_code == 200
