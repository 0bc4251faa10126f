"""LoRA adapters under Ray Serve, with Serve's own model multiplexing: a real local cluster, 2
engine replicas of a tiny Llama with two PEFT adapters, and Serve's default router (prefix
affinity off), so only the multiplexed model id (set by the ingress from ``model``, registered
by the replica's ``serve.multiplexed`` loader) keeps an adapter's requests on one replica."""

from __future__ import annotations

import time

import httpx
import pytest

from ray_fleet import serve_fleet
from tests.lora.adapters import make_adapters, peft_greedy

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

PROMPTS = [[5 + i, 17, 200, 33 + i, 8, 91, 4] for i in range(8)]
MAX_NEW = 5


@pytest.fixture(scope="module")
def lora_fleet(tiny_model_dir, tmp_path_factory):
    model = tiny_model_dir("llama-sharp")
    paths = make_adapters(model, str(tmp_path_factory.mktemp("ray-adapters")))
    config = {
        "model": model,
        "engine": {"device": "cpu", "dtype": "float32", "max_model_len": 256, "num_kv_blocks": 64,
                   "enable_lora": True, "max_loras": 1, "max_lora_rank": 32,
                   "kernel_warmup": False},
        "server": {"served_model_names": ["base"],
                   "lora_modules": {"qv8": paths["qv8"], "all32": paths["all32"]}},
        "num_replicas": 2,
        "router": {"prefix_affinity": False},  # Serve's power-of-two router, multiplex-aware
        "replica": {"num_cpus": 0.5}, "ingress": {"num_cpus": 0.25},
    }
    with serve_fleet(config) as url:
        yield url, model, paths

def _complete(url: str, model: str, prompt: list[int]) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0,
            "ignore_eos": True, "logprobs": 1}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r


def _tokens(r: httpx.Response) -> list[int]:
    return [int(t.strip("<>")) for t in r.json()["choices"][0]["logprobs"]["tokens"]]


def test_requests_for_one_adapter_stay_on_the_replica_holding_it(lora_fleet):
    url, model, paths = lora_fleet
    first = _complete(url, "qv8", PROMPTS[0])
    holder = first.headers["x-tessellm-replica"]
    assert _tokens(first) == peft_greedy(model, paths["qv8"], PROMPTS[:1], MAX_NEW)[0]
    time.sleep(1.0)  # the replica pushes its multiplexed ids every 0.1 s; the routers pick them up
    served = [_complete(url, "qv8", p) for p in PROMPTS[1:]]
    assert {r.headers["x-tessellm-replica"] for r in served} == {holder}
    seen = {}
    for _ in range(40):  # /debug/replica answers from whichever replica the router picks
        info = httpx.get(f"{url}/debug/replica", timeout=30).json()
        seen[info["replica_id"]] = info["lora_adapters"]
        if len(seen) == 2:
            break
    assert seen[holder] == ["qv8"] and all(v == [] for k, v in seen.items() if k != holder)
