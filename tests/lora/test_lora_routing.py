"""Ray Serve multiplexing of LoRA adapters, without a cluster: requests for one adapter share
the first link of their routing chain, so the affinity policy sends them to one replica."""

from __future__ import annotations

import json
import random

import pytest

from tessellm.entrypoints.openai.lora_modules import parse_lora_modules
from tessellm.entrypoints.ray_serve.affinity_policy import rank_replicas
from tessellm.entrypoints.ray_serve.prefix_index import PrefixIndex
from tessellm.entrypoints.ray_serve.prefix_key import prefix_hashes, route_keys

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
    # vLLM's JSON form, as its users write it on the command line
    assert parse_lora_modules(['{"name": "sql", "path": "/a/sql", "base_model_name": "m"}',
                               "chat=/a/chat"]) == [("sql", "/a/sql"), ("chat", "/a/chat")]
    for bad, match in (('{"name": "sql"}', "takes {\"name\""), ("{oops", "not valid JSON")):
        with pytest.raises(ValueError, match=match):
            parse_lora_modules([bad])


def test_route_keys_name_the_adapter_as_the_multiplexed_model_id():
    def keys(model, **kw):
        body = json.dumps({"model": model, "prompt": "a" * 40}).encode()
        return route_keys("/v1/completions", body, **CHUNK, lora_names=ADAPTERS, **kw)

    adapter, chain = keys("sql")
    assert adapter == "sql" and chain == _chain("sql", "a" * 40)
    assert keys("sql", hashes=False) == ("sql", [])  # prefix affinity off: the id alone
    assert keys("base")[0] == "" and keys("nope")[0] == ""  # the base model, an unknown name
    assert route_keys("/v1/models", b"", **CHUNK, lora_names=ADAPTERS) == ("", [])


def test_replicas_holding_the_adapter_win_within_the_load_check():
    rng = random.Random(0)
    chain = _chain("sql", "q" * 40)
    loads = {"r0": 0, "r1": 0, "r2": 0, "r3": 0}
    free = rank_replicas(chain, loads, PrefixIndex(100), 8, rng)[0][0]
    holder = next(r for r in loads if r != free)  # Serve says another replica holds "sql"
    ranks = rank_replicas(chain, loads, PrefixIndex(100), 8, rng, holders=frozenset({holder}))
    assert ranks[0] == [holder]
    # A second holder comes right after it (before the others), whatever the loads.
    second = next(r for r in loads if r not in (free, holder))
    loads = {"r0": 3, "r1": 3, "r2": 3, "r3": 3, free: 0, second: 5}
    ranks = rank_replicas(chain, loads, PrefixIndex(100), 8, rng, holders=frozenset({holder, second}))
    assert ranks[0] == [holder] and ranks[1][0] == second
    # A holder busier than the least loaded by more than the threshold is passed over.
    busy = {**{r: 0 for r in loads}, holder: 9}
    ranks = rank_replicas(chain, busy, PrefixIndex(100), 8, rng, holders=frozenset({holder}))
    assert ranks[0] != [holder] and ranks[1][0] == holder
    # Among several holders, the one that already holds the prompt's prefix wins.
    index = PrefixIndex(100)
    index.record(second, chain)
    both = frozenset({holder, second})
    assert rank_replicas(chain, {r: 0 for r in loads}, index, 8, rng, holders=both)[0] == [second]


def test_vllm_lora_flags_parse():
    """`vllm serve` LoRA flags: --lora-dtype auto and --fully-sharded-loras are accepted (no
    effect); another --lora-dtype is refused naming --dtype."""
    from tessellm.entrypoints.cli import build_parser

    args = build_parser().parse_args(["serve", "/m", "--enable-lora", "--lora-dtype", "auto",
                                      "--fully-sharded-loras", "--max-cpu-loras", "8",
                                      "--lora-modules", '{"name": "a", "path": "/a"}'])
    assert args.lora_modules == ['{"name": "a", "path": "/a"}'] and args.fully_sharded_loras
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "/m", "--lora-dtype", "bfloat16"])
