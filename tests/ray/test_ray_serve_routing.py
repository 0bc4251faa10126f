"""The Ray Serve app's pure parts, without a cluster: config parsing, prompt-prefix hashing and
the prefix-affinity policy (which replica a request goes to)."""

from __future__ import annotations

import argparse
import json
import random

import pytest

from tessellm.entrypoints.ray_serve.affinity_policy import rank_replicas, rendezvous_winner
from tessellm.entrypoints.ray_serve.config import parse_config
from tessellm.entrypoints.ray_serve.prefix_index import PrefixIndex
from tessellm.entrypoints.ray_serve.prefix_key import prefix_hashes

CHUNK = dict(chunk_chars=16, chunk_tokens=4, max_chunks=64)


def _hashes(path: str, body: dict) -> list[int]:
    return prefix_hashes(path, json.dumps(body).encode(), **CHUNK)


def test_a_responses_request_hashes_as_the_chat_request_it_means():
    long = "You are a careful assistant who answers briefly. " * 3
    chat = _hashes("/v1/chat/completions", {"messages": [{"role": "system", "content": long},
                                                         {"role": "user", "content": "Hello there, how are you?"}]})
    resp = _hashes("/v1/responses", {"instructions": long, "input": "Hello there, how are you?"})
    items = _hashes("/v1/responses", {"instructions": long, "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Hello there, how are you?"}]},
        {"type": "function_call_output", "call_id": "c", "output": "x"}]})
    assert chat and resp == chat == items
    assert _hashes("/v1/responses", {"input": 3}) == []


# -- config --------------------------------------------------------------------------------

def test_config_flat_dotted_strings_become_typed_fields():
    cfg = parse_config({"model": "null", "engine.device": "cpu", "engine.max_model_len": "512",
                        "num_replicas": "3", "router.prefix_affinity": "false",
                        "replica.num_cpus": "0.5", "autoscaling.max_replicas": "4"})
    assert cfg.model is None and cfg.engine == {"device": "cpu", "max_model_len": 512}
    assert cfg.num_replicas == 3 and cfg.router.prefix_affinity is False
    assert cfg.autoscaling.max_replicas == 4 and cfg.autoscaling.min_replicas == 1
    assert cfg.replica_actor_options() == {"num_cpus": 0.5}
    names = parse_config({"engine.device": "cpu", "server.served_model_names": "a,b"})
    assert names.server_config().served_model_names == ["a", "b"]


@pytest.mark.auto_device  # the CLI's device default, resolved from the cluster
def test_cli_flags_make_a_config_and_auto_device_follows_the_cluster():
    from tessellm.entrypoints.ray_serve.launch import config_from_args, resolve_auto_device
    from tessellm.entrypoints.serve import _server_config, add_serve_arguments

    parser = argparse.ArgumentParser()
    args = add_serve_arguments(parser).parse_args(["--ray", "--max-replicas", "3", "--max-model-len", "256"])
    config = config_from_args(args, _server_config(args))
    assert config["autoscaling"] == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 32.0}
    resolve_auto_device(config, {"CPU": 16, "GPU": 8})
    options = parse_config(config).replica_actor_options()
    assert options == {"num_cpus": 1.0, "num_gpus": 1}


@pytest.mark.parametrize("device,expected", [
    ("cuda", {"num_cpus": 1.0, "num_gpus": 1}), ("rocm", {"num_cpus": 1.0, "num_gpus": 1}),
    ("tpu", {"num_cpus": 1.0, "resources": {"TPU": 1}}), ("cpu", {"num_cpus": 1.0})])
def test_replicas_ask_ray_for_their_backends_accelerator(device, expected):
    assert parse_config({"engine": {"device": device}}).replica_actor_options() == expected


def test_a_tensor_parallel_replica_holds_all_its_devices():
    cfg = parse_config({"engine": {"device": "cuda", "tensor_parallel_size": 2,
                                   "pipeline_parallel_size": 2}})
    assert cfg.replica_actor_options() == {"num_cpus": 1.0, "num_gpus": 4}
    with pytest.raises(ValueError, match="distributed_executor_backend 'ray'"):
        parse_config({"engine": {"device": "cuda", "tensor_parallel_size": 2,
                                 "distributed_executor_backend": "ray"}})


@pytest.mark.parametrize("args,needle", [
    ({"engine": {"device": "cpu"}, "replicas": 2}, "Unknown tessellm Ray Serve option(s): replicas"),
    ({"engine": {"device": "cpu", "max_len": 3}}, "Unknown option(s) in 'engine': max_len"),
    ({"engine": {"device": "auto"}}, "set engine.device"),
    ({"engine": {"device": "mynpu"}}, "plugin backend"),
    ({"engine": {"device": "cpu"}, "num_replicas": "two"}, "cannot read 'two' as int"),
    ({"engine": {"device": "cpu"}, "autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas"),
    ({"engine": {"device": "cpu", "data_parallel_size": 2}}, "scale out with num_replicas (--num-replicas)"),
    ({"engine.device": "cpu", "engine.data_parallel_size": "2"}, "engine.data_parallel_size 2 runs"),
])
def test_bad_config_fails_loudly_naming_the_option(args, needle):
    with pytest.raises(ValueError) as info:
        parse_config(args)
    assert needle in str(info.value)


def test_plugin_backend_runs_with_an_explicit_resource():
    cfg = parse_config({"engine": {"device": "mynpu"}, "replica": {"resources": {"NPU": 1}}})
    assert cfg.replica_actor_options() == {"num_cpus": 1.0, "resources": {"NPU": 1}}


# -- prefix hashes -------------------------------------------------------------------------

def test_prompts_sharing_a_prefix_share_leading_hashes():
    a = _hashes("/v1/completions", {"prompt": "x" * 40 + "first question, long enough"})
    b = _hashes("/v1/completions", {"prompt": "x" * 40 + "second question, long enough"})
    assert len(a) == len(b) == 4
    assert a[:2] == b[:2] and a[2] != b[2] and a[3] != b[3]  # chunk 2 differs, and so does all after


def test_chat_and_token_prompts_hash_and_other_routes_do_not():
    system = {"role": "system", "content": "Be brief and polite. " * 4}
    a = _hashes("/v1/chat/completions", {"messages": [system, {"role": "user", "content": "hi"}]})
    b = _hashes("/v1/chat/completions", {"messages": [system, {"role": "user", "content": "yo"}]})
    assert a and a[:4] == b[:4]
    tokens = _hashes("/v1/completions", {"prompt": [[1, 2, 3, 4, 5, 6, 7, 8, 9]]})
    assert len(tokens) == 2
    assert _hashes("/tokenize", {"prompt": "x" * 100}) == []
    assert prefix_hashes("/v1/completions", b"{not json", **CHUNK) == []
    assert _hashes("/v1/completions", {"prompt": "short"}) == []


# -- the policy ----------------------------------------------------------------------------

def test_a_known_prefix_goes_back_to_its_replica():
    index = PrefixIndex(1000)
    chain = [11, 22, 33]
    index.record("b", chain)
    ranks = rank_replicas(chain + [44], {"a": 0, "b": 3, "c": 1}, index, imbalance_threshold=4)
    assert ranks == [["b"], ["a", "c"]]


def test_the_longest_match_wins():
    index = PrefixIndex(1000)
    index.record("a", [1, 2])
    index.record("b", [1, 2, 3, 4])
    assert rank_replicas([1, 2, 3, 4, 5], {"a": 0, "b": 0}, index, 8)[0] == ["b"]


def test_a_much_busier_holder_is_passed_over():
    index = PrefixIndex(1000)
    index.record("b", [7, 8])
    ranks = rank_replicas([7, 8], {"a": 0, "b": 9}, index, imbalance_threshold=8)
    assert ranks[0] == ["a"]


def test_a_new_prefix_goes_to_the_same_replica_from_every_router():
    loads = {"r1": 0, "r2": 0, "r3": 0}
    firsts = {rank_replicas([99, 5], loads, PrefixIndex(10), 8)[0][0] for _ in range(5)}
    assert firsts == {rendezvous_winner(99, list(loads))}
    spread = {rendezvous_winner(k, list(loads)) for k in range(200)}
    assert spread == set(loads)  # different prefixes spread over all replicas


def test_no_prefix_goes_to_a_least_loaded_replica():
    rng = random.Random(0)
    picks = {rank_replicas([], {"a": 2, "b": 0, "c": 0}, PrefixIndex(10), 8, rng)[0][0] for _ in range(20)}
    assert picks == {"b", "c"}


def test_index_is_bounded_and_forgets_gone_replicas():
    index = PrefixIndex(3)
    index.record("a", [1, 2, 3, 4, 5])
    assert index.num_entries("a") == 3 and index.match([3, 4, 5], ["a"]) == {"a": 3}
    assert index.match([1, 2], ["a"]) == {"a": 0}  # the oldest were evicted
    index.retain(["b"])
    assert index.num_entries("a") == 0
