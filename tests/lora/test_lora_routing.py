"""Ray Serve multiplexing of LoRA adapters, without a cluster: requests for one adapter share
the first link of their routing chain, so the affinity policy sends them to one replica."""

from __future__ import annotations

import json
import random

from tessellm.entrypoints.openai.lora_modules import parse_lora_modules
from tessellm.entrypoints.ray_serve.affinity_policy import rank_replicas
from tessellm.entrypoints.ray_serve.prefix_index import PrefixIndex
from tessellm.entrypoints.ray_serve.prefix_key import prefix_hashes

CHUNK = dict(chunk_chars=16, chunk_tokens=4, max_chunks=64)
ADAPTERS = frozenset({"sql", "chat"})


def _chain(model: str, prompt: str) -> list[int]:
    body = json.dumps({"model": model, "prompt": prompt}).encode()
    return prefix_hashes("/v1/completions", body, **CHUNK, lora_names=ADAPTERS)


def test_requests_for_one_adapter_prefer_one_replica():
    rng = random.Random(0)
    index = PrefixIndex(1000)
    loads = {f"replica-{i}": 0 for i in range(4)}
    chosen = {}
    for i in range(40):
        model = ("sql", "chat")[i % 2]
        prompt = "".join(rng.choice("abcdefgh") for _ in range(40))  # no shared prompt prefix
        chain = _chain(model, prompt)
        first = rank_replicas(chain, loads, index, imbalance_threshold=8, rng=rng)[0][0]
        index.record(first, chain)
        chosen.setdefault(model, set()).add(first)
    assert all(len(replicas) == 1 for replicas in chosen.values())
    # The base model's requests keep spreading by their prompts.
    base = {rank_replicas(_chain("base", "".join(rng.choice("xyz") for _ in range(40))), loads,
                          PrefixIndex(1000), 8, rng)[0][0] for _ in range(20)}
    assert len(base) > 1


def test_adapter_and_prompt_chains():
    with_adapter = _chain("sql", "a" * 48)
    base = _chain("base", "a" * 48)
    assert len(with_adapter) == len(base) + 1 and not set(with_adapter) & set(base)
    assert _chain("sql", "b" * 48)[0] == with_adapter[0] != _chain("chat", "a" * 48)[0]


def test_lora_modules_forms():
    assert parse_lora_modules(["a=/x", ("b", "/y")]) == [("a", "/x"), ("b", "/y")]
    assert parse_lora_modules({"c": "/z"}) == [("c", "/z")]
