"""Structured output with LoRA adapters: a constrained request with an adapter gives the tokens
of the same constrained request on the model with that adapter merged into its weights, in a
batch mixing adapters, the base model and unconstrained requests (the tiny sharp Llama with a
small byte-level tokenizer, float32); offline, through chat, and at the server
(``response_format`` json_schema, n > 1)."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from tessellm import LLM, SamplingParams
from tessellm.lora import LoRARequest
from tessellm.structured_output import StructuredOutputsParams as S
from tests.lora.adapters import add_byte_tokenizer, merge_adapter
from tests.server.conftest import start_server, stop_server

pytest.importorskip("xgrammar")

SCHEMA = {"type": "object", "properties": {
    "name": {"enum": ["abc", "x", "yes", "hello"]},
    "age": {"type": "integer", "minimum": 0, "maximum": 99},
    "ok": {"type": "boolean"}}, "required": ["name", "age", "ok"], "additionalProperties": False}
PROMPTS = ["The answer is", "hello world", '{"name": "abc"']


def _json(max_tokens=40) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens,
                          structured_outputs=S(json=SCHEMA, disable_any_whitespace=True))


def _choice() -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=12,
                          structured_outputs=S(choice=["yes", "no", "hello world"]))


@pytest.fixture(scope="module")
def models(lora_setup, tmp_path_factory):
    """(base dir, {adapter: merged dir}, {adapter: adapter dir}), all with the tokenizer."""
    model, paths = lora_setup
    root = tmp_path_factory.mktemp("lora-structured")
    base = str(root / "base")
    shutil.copytree(model, base)
    add_byte_tokenizer(base)
    merged = {n: merge_adapter(base, paths[n], str(root / n)) for n in ("qv8", "all32")}
    return base, merged, paths


def _run(model, prompts, params, loras=None, **kw) -> list:
    with LLM(model, dtype="float32", **kw) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
    return [o.outputs[0].token_ids for o in outs]


def test_constrained_requests_with_adapters_match_merged_models(models):
    base, merged, paths = models
    loras = {"qv8": LoRARequest("qv8", 1, paths["qv8"]), "all32": LoRARequest("all32", 2, paths["all32"])}
    jobs = [(p, n, kind) for p in range(len(PROMPTS)) for n in (None, "qv8", "all32")
            for kind in ("json", "choice", "free")]
    make = {"json": _json, "choice": _choice,
            "free": lambda: SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)}
    got = _run(base, [PROMPTS[p] for p, _, _ in jobs], [make[k]() for _, _, k in jobs],
               [loras.get(n) for _, n, _ in jobs], enable_lora=True, max_lora_rank=32, max_loras=2)
    for name in (None, "qv8", "all32"):
        mine = [(j, (p, k)) for j, (p, n, k) in enumerate(jobs) if n == name]
        want = _run(merged.get(name, base), [PROMPTS[p] for _, (p, _) in mine],
                    [make[k]() for _, (_, k) in mine])
        assert [got[j] for j, _ in mine] == want, name
    texts = {}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    for j, (p, n, kind) in enumerate(jobs):
        text = tok.decode(got[j], skip_special_tokens=True)
        if kind == "json":
            value = json.loads(text)
            assert set(value) == {"name", "age", "ok"} and 0 <= value["age"] <= 99
            assert value["name"] in SCHEMA["properties"]["name"]["enum"]
        elif kind == "choice":
            assert text in ("yes", "no", "hello world")
        texts[(p, n, kind)] = text
    # The adapters matter under the constraint too.
    assert any(texts[(p, "all32", "json")] != texts[(p, None, "json")] for p in range(len(PROMPTS)))


def test_chat_takes_an_adapter(models):
    base, merged, paths = models
    conv = [{"role": "user", "content": "hello world"}]
    lora = LoRARequest("all32", 2, paths["all32"])
    with LLM(base, dtype="float32", enable_lora=True, max_lora_rank=32) as llm:
        got = llm.chat([conv, conv], _json(), use_tqdm=False,
                       lora_request=[lora, None])
    with LLM(merged["all32"], dtype="float32") as llm:
        want = llm.chat(conv, _json(), use_tqdm=False)
    assert got[0].outputs[0].token_ids == want[0].outputs[0].token_ids
    assert got[1].outputs[0].token_ids != got[0].outputs[0].token_ids


def test_server_response_format_with_an_adapter(models):
    base, merged, paths = models
    conv = [{"role": "user", "content": "The answer is"}]
    with LLM(merged["all32"], dtype="float32") as llm:
        want = llm.chat(conv, _json(), use_tqdm=False)[0].outputs[0].text
    with LLM(base, dtype="float32") as llm:
        plain = llm.chat(conv, _json(), use_tqdm=False)[0].outputs[0].text
    assert want != plain and json.loads(want)["age"] >= 0  # the adapter matters
    srv = start_server([base, "--dtype", "float32", "--enable-lora", "--max-lora-rank", "32",
                        "--lora-modules", f"all32={paths['all32']}", "--max-model-len", "256",
                        "--no-kernel-warmup"])
    try:
        fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
        body = {"messages": conv, "max_tokens": 40, "temperature": 0, "n": 2,
                "response_format": fmt, "structured_outputs": {"disable_any_whitespace": True}}
        with httpx.Client(base_url=srv.url, headers=srv.headers, timeout=120) as http:
            r = http.post("/v1/chat/completions", json={**body, "model": "all32"})
            assert r.status_code == 200, r.text
            assert [c["message"]["content"] for c in r.json()["choices"]] == [want, want]
            r = http.post("/v1/chat/completions", json={**body, "model": base, "n": 1})
            assert r.json()["choices"][0]["message"]["content"] == plain
    finally:
        stop_server(srv)
