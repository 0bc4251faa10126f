"""The model's generation_config.json sets the sampling defaults of requests that leave them
unset, as vLLM's ``--generation-config auto`` does; ``vllm`` turns it off, an override JSON is
laid over it, and a request's own values win."""

from __future__ import annotations

import asyncio
import json
import os
import shutil

import httpx
import pytest

from tessellm import LLM, SamplingParams
from tessellm.config import EngineArgs

PROMPT = {"prompt_token_ids": [5, 17, 42, 99, 3, 250]}
# Qwen2.5-Instruct's recommended sampling, plus an output budget.
QWEN_LIKE = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
             "repetition_penalty": 1.05, "max_new_tokens": 7, "eos_token_id": 2}


@pytest.fixture(scope="module")
def model_with_gen_config(tiny_model_dir, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gen-config") / "llama")
    shutil.copytree(tiny_model_dir("llama-sharp"), path)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(QWEN_LIKE, f)
    return path


def _llm(model: str, **kwargs) -> LLM:
    return LLM(model, num_kv_blocks=32, max_model_len=128, **kwargs)


def test_auto_takes_the_models_sampling_defaults(model_with_gen_config):
    llm = _llm(model_with_gen_config)
    d = llm.get_default_sampling_params()
    assert (d.temperature, d.top_p, d.top_k, d.repetition_penalty, d.max_tokens) == (0.7, 0.8, 20, 1.05, 7)
    out = llm.generate(PROMPT, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 7  # max_new_tokens is the default budget


def test_vllm_choice_and_override(model_with_gen_config):
    neutral = _llm(model_with_gen_config, generation_config="vllm").get_default_sampling_params()
    assert (neutral.temperature, neutral.top_p, neutral.top_k) == (1.0, 1.0, SamplingParams().top_k)
    llm = _llm(model_with_gen_config, override_generation_config='{"temperature": 0, "max_new_tokens": 5}')
    d = llm.get_default_sampling_params()
    assert (d.temperature, d.top_p, d.max_tokens) == (0, 0.8, 5)
    # Greedy by the override: the same tokens as an explicit greedy request of the same length.
    implicit = llm.generate(PROMPT, use_tqdm=False)[0].outputs[0].token_ids
    explicit = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=5, repetition_penalty=1.05),
                            use_tqdm=False)[0].outputs[0].token_ids
    assert list(implicit) == list(explicit) and len(implicit) == 5


@pytest.mark.parametrize("kwargs, match", [
    ({"override_generation_config": '{"temprature": 0.5}'}, "unknown keys"),
    ({"override_generation_config": "{temperature: 0.5"}, "not valid JSON"),
    ({"override_generation_config": "[1]"}, "JSON object"),
    ({"generation_config": "/no/such/dir"}, "neither 'auto', 'vllm' nor a directory"),
])
def test_bad_generation_config_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineArgs(**kwargs).validate()


async def _server_scenario(gen_dir: str):
    from tessellm.entrypoints.async_llm import AsyncLLM
    from tessellm.entrypoints.openai.api_server import build_app
    from tessellm.entrypoints.openai.server_config import ServerConfig

    engine = AsyncLLM(EngineArgs(max_model_len=256, num_kv_blocks=64, max_num_seqs=8,
                                 generation_config=gen_dir))
    try:
        engine.start()
        app = build_app(engine, ServerConfig(["m"]))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                     timeout=120) as c:
            body = {"model": "m", "prompt": "The capital of France is"}
            implicit = (await c.post("/v1/completions", json=body)).json()
            explicit = (await c.post("/v1/completions", json={**body, "temperature": 0, "max_tokens": 4})).json()
            sampled = (await c.post("/v1/completions", json={**body, "temperature": 1.0, "seed": 3,
                                                             "max_tokens": 12})).json()
            chat = (await c.post("/v1/chat/completions", json={
                "model": "m", "messages": [{"role": "user", "content": "Hi"}]})).json()
        return implicit, explicit, sampled, chat
    finally:
        await engine.shutdown()


def test_server_requests_default_to_the_generation_config(tmp_path):
    """The bundled GGUF has no generation config; a directory given by --generation-config
    supplies greedy decoding with a 4-token budget to requests that set neither."""
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "max_new_tokens": 4}))
    implicit, explicit, sampled, chat = asyncio.run(_server_scenario(str(tmp_path)))
    assert implicit["usage"]["completion_tokens"] == 4, implicit
    assert implicit["choices"][0]["text"] == explicit["choices"][0]["text"]
    assert sampled["usage"]["completion_tokens"] == 12  # the request's own values win
    assert chat["usage"]["completion_tokens"] <= 4, chat  # chat's default budget is capped too
