"""vLLM's names through the Ray Serve path, without a cluster: several API keys at the ingress,
vLLM's engine arguments in the config's ``engine`` section (the table in vllm_args.py) and the
model's --download-dir / --revision carried to the replicas."""

from __future__ import annotations

import pytest

from tessellm.entrypoints.ray_serve.config import parse_config
from tessellm.entrypoints.cli import build_parser
from tessellm.entrypoints.serve import _server_config


def _ray_config(argv: list) -> dict:
    from tessellm.entrypoints.ray_serve.launch import config_from_args

    args = build_parser().parse_args(["serve", "--ray", "--device", "cpu", *argv])
    return config_from_args(args, _server_config(args))


# -- --api-key K1 K2 -------------------------------------------------------------------------

def test_the_ingress_accepts_any_of_several_keys_from_the_cli_and_a_config():
    from tessellm.entrypoints.ray_serve.ingress import api_keys, authorized

    from_cli = parse_config(_ray_config(["--api-key", "k1", "k2"])).server_config()
    from_file = parse_config({"engine": {"device": "cpu"},
                              "server": {"api_key": ["k1", "k2"]}}).server_config()
    for server in (from_cli, from_file):
        assert (server.api_key, server.extra_api_keys) == ("k1", ("k2",))  # the replica's app: both
        keys = api_keys(server)
        assert authorized(keys, "Bearer k1") and authorized(keys, "bearer k2")
        assert not authorized(keys, "Bearer k3") and not authorized(keys, "")
        assert not authorized(keys, "Basic k1")
    one = parse_config({"engine.device": "cpu", "server.api_key": "k1"}).server_config()
    assert api_keys(one) == ("k1",) and not authorized(api_keys(one), "Bearer k2")
    assert authorized(api_keys(parse_config({"engine": {"device": "cpu"}}).server_config()), "")


def test_an_empty_key_in_a_config_is_refused_naming_it():
    with pytest.raises(ValueError, match="server.api_key"):
        parse_config({"engine": {"device": "cpu"}, "server": {"api_key": ["k1", ""]}})
