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


# -- vLLM's engine arguments in the engine section -----------------------------------------

def test_vllm_engine_names_in_a_config_are_translated_as_on_tessellm_serve():
    from tessellm.entrypoints.ray_serve.config import config_to_dict

    cfg = parse_config({"engine": {"device": "cpu", "gpu_memory_utilization": 0.5, "swap_space": 4,
                                   "num_gpu_blocks_override": 64, "rope-theta": 10000,
                                   "trust_remote_code": True, "enable_log_requests": True}})
    assert cfg.engine == {"device": "cpu", "gpu_memory_utilization": 0.5, "num_kv_blocks": 64,
                          "hf_overrides": {"rope_theta": 10000}}
    assert cfg.server_config().log_requests is True
    flat = parse_config({"engine.device": "cpu", "engine.num_gpu_blocks_override": "64",
                         "engine.swap_space": "4", "engine.cuda_graph_sizes": "1,2"})
    assert flat.engine == {"device": "cpu", "num_kv_blocks": 64}
    # what a replica parses again (config_to_dict's engine section) means the same
    again = parse_config(config_to_dict(cfg, ("model", "engine", "server")), check_resources=False)
    assert again.engine == cfg.engine and again.engine_args().num_kv_blocks == 64
    # the command line's vLLM flags, through the same table
    cli = parse_config(_ray_config(["--num-gpu-blocks-override", "64", "--swap-space", "4"]))
    assert cli.engine_args().num_kv_blocks == 64


@pytest.mark.parametrize("engine,needle", [
    ({"cpu_offload_gb": 4}, "engine.cpu_offload_gb: 4 is not supported by tessellm"),
    ({"scheduling_policy": "lifo"}, "scheduling_policy 'lifo' is not supported; use fcfs"),
    ({"swap_space": "lots"}, "'engine.swap_space': cannot read 'lots' as float"),
    ({"gpu_memory_utilisation": 0.5}, "Unknown option(s) in 'engine': gpu_memory_utilisation"),
    ({"max_model_len": -1}, "engine section: max_model_len must be a positive integer"),
])
def test_a_refused_engine_value_is_one_error_naming_the_key(engine, needle):
    with pytest.raises(ValueError) as info:
        parse_config({"engine": {"device": "cpu", **engine}})
    assert needle in str(info.value)


# -- vLLM's server arguments in the server section -----------------------------------------

def test_vllm_server_names_in_a_config_mean_what_the_cli_flags_mean(tmp_path):
    """A vLLM user's server names (as `vllm serve` flags, dashes or underscores) configure the
    replicas' app as the same `tessellm serve` flags do; the chat template file is read once."""
    from tessellm.entrypoints.ray_serve.config import config_to_dict

    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    flags = ["--api-key", "k1", "--served-model-name", "chat", "--chat-template", str(template),
             "--response-role", "bot", "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
             "--enable-request-id-headers", "--allowed-origins", '["https://a.example"]',
             "--enable-log-outputs", "--max-log-len", "9", "--disable-uvicorn-access-log"]
    cli = parse_config(_ray_config(flags)).server_config()
    names = {"api_key": "k1", "served_model_name": "chat", "chat_template": str(template),
             "response-role": "bot", "enable_auto_tool_choice": True, "tool_call_parser": "hermes",
             "enable_request_id_headers": True, "allowed_origins": '["https://a.example"]',
             "enable_log_outputs": True, "max_log_len": 9, "disable_uvicorn_access_log": True,
             "data_parallel_size_local": 1}
    from_file = parse_config({"engine": {"device": "cpu"}, "server": names})
    flat = parse_config({"engine.device": "cpu", **{f"server.{k}": str(v) for k, v in names.items()}})
    for cfg in (from_file, flat):
        assert cfg.server_config() == cli
    replica = parse_config(config_to_dict(from_file, ("model", "engine", "server")), check_resources=False)
    assert replica.server_config() == cli  # the template's text travelled, not its path


def test_data_parallel_size_local_equal_to_the_engines_dp_as_flat_strings():
    """`serve run engine.data_parallel_size=1 server.data_parallel_size_local=1`: both strings,
    equal once read as numbers: accepted (the string "1" was compared with the number 1)."""
    flat = {"engine.device": "cpu", "engine.data_parallel_size": "1", "server.data_parallel_size_local": "1"}
    assert parse_config(flat).server_config() == parse_config({"engine.device": "cpu"}).server_config()
    with pytest.raises(ValueError, match="data_parallel_size_local: 2 is not supported .* value, 1\\)"):
        parse_config({**flat, "server.data_parallel_size_local": "2"})


@pytest.mark.parametrize("server,needle", [
    ({"api_server_count": 4}, "server.api_server_count: 4 is not supported by tessellm"),
    ({"data_parallel_size_local": 2}, "server.data_parallel_size_local: 2 is not supported"),
    ({"served_model_name": "a", "served_model_names": ["b"]}, "give one of them"),
    ({"chat_template": "/no/such/template.jinja"}, "is not a file"),
    ({"enable_auto_tool_choise": True}, "or one of vLLM's server arguments"),
])
def test_a_refused_server_value_is_one_error_naming_the_key(server, needle):
    with pytest.raises(ValueError) as info:
        parse_config({"engine": {"device": "cpu"}, "server": server})
    assert needle in str(info.value)


# -- --download-dir / --revision: each replica finds the snapshot on its node ----------------

def _hf_cache(root, repo: str = "org/tiny", sha: str = "a" * 40):
    snap = root / f"models--{repo.replace('/', '--')}" / "snapshots" / sha
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (root / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (root / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text(sha)
    return str(snap)


def test_download_dir_travels_to_the_replicas_which_resolve_it(tmp_path):
    from tessellm.entrypoints.ray_serve.config import config_to_dict

    missing = str(tmp_path / "not-here")  # the head looks nothing up: it may hold no weights
    config = _ray_config(["org/tiny", "--download-dir", missing, "--revision", "main"])
    assert config["model"] == "org/tiny"
    assert {k: config["engine"][k] for k in ("download_dir", "revision")} == \
        {"download_dir": missing, "revision": "main"}
    head = parse_config(config)
    assert head.server_config().served_model_names == ["org/tiny"]
    snap = _hf_cache(tmp_path / "cache")
    for cfg in ({"model": "org/tiny", "engine": {"device": "cpu", "download_dir": str(tmp_path / "cache")}},
                {"model": "org/tiny", "engine.device": "cpu", "engine.download_dir": str(tmp_path / "cache"),
                 "engine.revision": "a" * 40}):
        replica = parse_config(config_to_dict(parse_config(cfg), ("model", "engine", "server")),
                               check_resources=False)  # as engine_replica.py parses its part
        assert replica.engine_args().model == snap
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache in"):
        parse_config(config, check_resources=False).engine_args()


# -- where Serve listens: the proxies' http_options, never silently dropped ------------------

@pytest.mark.parametrize("config,needle", [
    ({"server": {"host": "0.0.0.0"}}, "server.host: where Serve listens"),
    ({"server": {"ssl-certfile": "/c.pem"}}, "server.ssl_certfile: where Serve listens"),
    ({"server.port": "9000"}, "server.port: where Serve listens"),
    ({"port": 9000}, "port: where Serve listens"),
])
def test_listener_keys_in_a_config_point_at_serves_http_options(config, needle):
    with pytest.raises(ValueError) as info:
        parse_config({"engine.device": "cpu", **config})
    assert needle in str(info.value) and "http_options" in str(info.value)


def test_serve_ray_passes_https_to_the_proxies_and_refuses_what_they_cannot_do(tmp_path):
    pytest.importorskip("ray.serve")
    from tessellm.entrypoints.ray_serve.launch import http_options

    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    parser = build_parser()
    args = parser.parse_args(["serve", "--ray", "--device", "cpu", "--host", "0.0.0.0", "--port", "8443",
                              "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)])
    assert http_options(args) == {"host": "0.0.0.0", "port": 8443, "ssl_certfile": str(cert),
                                  "ssl_keyfile": str(key)}
    plain = parser.parse_args(["serve", "--ray", "--device", "cpu"])
    assert http_options(plain) == {"host": plain.host, "port": plain.port}
    for flags, needle in ((["--uds", str(tmp_path / "s.sock")], "--uds: Ray Serve's proxies listen on TCP"),
                          (["--ssl-certfile", str(cert), "--ssl-cert-reqs", "2"], "--ssl-cert-reqs"),
                          (["--ssl-certfile", str(cert), "--ssl-ciphers", "ECDHE"], "--ssl-ciphers"),
                          (["--ssl-certfile", str(tmp_path / "none.pem")], "is not a file")):
        with pytest.raises(ValueError, match=needle):
            http_options(parser.parse_args(["serve", "--ray", "--device", "cpu", *flags]))
