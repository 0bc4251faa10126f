"""/v1/completions ``prompt_embeds`` in process (the app over a real AsyncLLM and engine core
process, a tiny Llama): base64 ``torch.save`` bytes, one or a list, give HF
``generate(inputs_embeds=...)``'s greedy tokens, also mixed with token prompts (the embeddings'
prompts first, as vLLM); bad payloads, a wrong hidden size, no prompt at all, and a server
without --enable-prompt-embeds are 400s naming the field."""

from __future__ import annotations

import asyncio
import base64
import io

import torch

from tessellm.config import EngineArgs
from tests.server.in_process import serve as _serve

IDS = [1, 5, 9, 22, 33, 44, 55, 66, 77]


def _b64(tensor: torch.Tensor) -> str:
    buf = io.BytesIO()
    torch.save(tensor, buf)
    return base64.b64encode(buf.getvalue()).decode()


def _body(embeds, **extra) -> dict:
    return {"model": "m", "prompt_embeds": embeds, "max_tokens": 6, "temperature": 0,
            "return_token_ids": True, **extra}


def _error(r, param: str, text: str) -> None:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and text in err["message"], err


def test_completions_prompt_embeds(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir("llama")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        a = hf.get_input_embeddings()(torch.tensor(IDS)) + 0.5 * torch.randn(len(IDS), 64)
        b = hf.get_input_embeddings()(torch.tensor(IDS[:5])) + 0.5 * torch.randn(5, 64)
        expected = [hf.generate(inputs_embeds=e[None], attention_mask=torch.ones(1, len(e), dtype=torch.long),
                                max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)[0].tolist()
                    for e in (a, b)]

    async def scenario(c):
        r = await c.post("/v1/completions", json={**_body(None), "prompt": IDS, "prompt_embeds": None})
        token_ids = r.json()["choices"][0]["token_ids"]
        r = await c.post("/v1/completions", json=_body(_b64(a)))
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == expected[0]
        r = await c.post("/v1/completions", json=_body([_b64(a), _b64(b)]))
        assert [ch["token_ids"] for ch in sorted(r.json()["choices"], key=lambda ch: ch["index"])] == expected
        _error(await c.post("/v1/completions", json=_body("not base64!")), "prompt_embeds", "base64")
        _error(await c.post("/v1/completions", json=_body(base64.b64encode(b"junk").decode())),
               "prompt_embeds", "torch.save")
        _error(await c.post("/v1/completions", json=_body(_b64(torch.zeros(3, 32)))), "prompt_embeds",
               "hidden size is 64")
        _error(await c.post("/v1/completions", json=_body(_b64({"x": torch.zeros(2)}))), "prompt_embeds",
               "one tensor")
        r = await c.post("/v1/completions", json=_body(_b64(b), prompt=[IDS]))  # vLLM: embeds first
        assert [ch["token_ids"] for ch in sorted(r.json()["choices"], key=lambda ch: ch["index"])] == [
            expected[1], token_ids]
        _error(await c.post("/v1/completions", json={"model": "m", "max_tokens": 2}), "prompt", "prompt")
        r = await c.post("/v1/completions", json=_body(_b64(a)))
        assert r.json()["choices"][0]["token_ids"] == expected[0]  # serves on

    asyncio.run(_serve(EngineArgs(model=path, device="cpu", num_kv_blocks=64, enable_prompt_embeds=True),
                       scenario))


def test_prompt_embeds_need_the_flag(tiny_model_dir):
    async def scenario(c):
        _error(await c.post("/v1/completions", json=_body(_b64(torch.zeros(3, 64)))), "prompt_embeds",
               "--enable-prompt-embeds")

    asyncio.run(_serve(EngineArgs(model=tiny_model_dir("llama"), device="cpu", num_kv_blocks=16), scenario))
