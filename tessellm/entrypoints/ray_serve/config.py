"""The Ray Serve application's configuration: one dict in, checked loudly, typed out.

The same dict comes from three places: ``tessellm serve --ray`` (built from its flags), a Serve
config file (``applications[].args``) and ``serve run IMPORT_PATH key=value ...`` (flat strings).
Nested keys may be given flat with dots (``engine.max_model_len=1024``); strings are converted
to each field's type. Unknown keys are an error naming the key, never silently ignored::

    model: null                 # model path / .gguf / cached HF repo id; null: bundled SmolLM2
    engine: {...}               # EngineArgs fields (device, max_model_len, num_kv_blocks, ...)
    server: {...}               # ServerConfig fields (served_model_names, api_key: K or [K1, K2], max_n, ...)
    #                             or vLLM's server names (served_model_name, chat_template: a file, ...)
    num_replicas: 1             # fixed replica count (ignored when autoscaling is given)
    autoscaling: {min_replicas, max_replicas, target_ongoing_requests, ...}
    replica: {num_cpus, num_gpus, resources, max_ongoing_requests, ...}
    router: {prefix_affinity, balance, imbalance_threshold, load_report_period_s, chunk_chars, ...}
    ingress: {num_replicas, num_cpus, max_ongoing_requests, retries, graceful_shutdown_timeout_s, ...}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from tessellm.config import EngineArgs
from tessellm.entrypoints.openai.server_config import ServerConfig
from tessellm.entrypoints.ray_serve.replica_load import BALANCES

# Ray resources a replica of each in-tree backend asks for. Ray schedules NVIDIA, AMD and Intel
# GPUs all as "GPU" and TPU chips as "TPU". A plugin backend must name its own resource.
_BACKEND_RESOURCES = {"cpu": {}, "cuda": {"num_gpus": 1}, "rocm": {"num_gpus": 1},
                      "xpu": {"num_gpus": 1}, "tpu": {"resources": {"TPU": 1}}}


@dataclass
class ReplicaOptions:
    """One engine replica: what it asks Ray for and how Serve treats it."""

    num_cpus: Optional[float] = None  # CPUs reserved per replica; None: fitted to the cluster
    #                                   (resources.py: at most 1, less where the cluster is small)
    num_gpus: Optional[float] = None  # None: from the device (1 for cuda/rocm/xpu, 0 for cpu)
    resources: dict = field(default_factory=dict)  # custom Ray resources, e.g. {"TPU": 1}
    max_ongoing_requests: int = 256  # Serve queues requests beyond this at the router
    max_queued_requests: int = -1  # -1: unbounded; else Serve answers 503 beyond this
    graceful_shutdown_timeout_s: float = 60.0  # how long a stopping replica drains its requests
    graceful_shutdown_wait_loop_s: float = 2.0  # how often it checks that it has drained
    health_check_period_s: float = 10.0  # how often Serve asks the replica's engine if it is alive
    health_check_timeout_s: float = 30.0
    env_vars: dict = field(default_factory=dict)  # extra environment for the replica process


@dataclass
class AutoscalingOptions:
    """Serve's autoscaler on ongoing requests per replica (queued + running at the replica)."""

    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: Optional[int] = None  # None: min_replicas
    target_ongoing_requests: float = 32.0  # scale so each replica has about this many
    upscale_delay_s: float = 30.0  # the load must stay high this long before adding replicas
    downscale_delay_s: float = 600.0  # ... and low this long before removing them

    def to_serve(self) -> dict:
        out = dataclasses.asdict(self)
        if out["initial_replicas"] is None:
            del out["initial_replicas"]
        return out


@dataclass
class RouterOptions:
    """The prefix-affinity request router (see prefix_router.py)."""

    prefix_affinity: bool = True  # False: Serve's default power-of-two-choices router
    balance: str = "load"  # load: the engines' reported queues, scored as the data-parallel
    #                        balancer does; in_flight: requests in flight (replica_load.py)
    load_report_period_s: float = 1.0  # how often each replica reports its engine's load
    chunk_chars: int = 128  # prompt characters per prefix chunk (about 30 tokens of English)
    chunk_tokens: int = 32  # token-id prompts: ids per chunk
    max_chunks: int = 64  # only the first max_chunks chunks are looked at
    imbalance_threshold: int = 8  # leave the prefix's replica when its load figure is this
    #                               much above the least one's (load: score points, 8 = two
    #                               queued requests, or an eighth more; in_flight: requests)
    max_entries_per_replica: int = 50_000  # chunk hashes remembered per replica (LRU)


@dataclass
class IngressOptions:
    """The HTTP ingress deployment (forwards requests; no model)."""

    num_replicas: int = 1
    num_cpus: Optional[float] = None  # None: fitted to the cluster (0.5, less on a small one)
    max_ongoing_requests: int = 2048  # concurrent client connections per ingress replica
    retries: int = 1  # re-send a request whose replica died before answering anything
    graceful_shutdown_timeout_s: float = 60.0  # how long a stopping ingress lets its streams finish
    retry_after_s: int = 5  # Retry-After of the 503 a draining ingress answers new requests with


@dataclass
class RayServeConfig:
    model: Optional[str] = None
    engine: dict = field(default_factory=dict)  # EngineArgs fields, except model
    server: dict = field(default_factory=dict)  # ServerConfig fields
    num_replicas: int = 1
    autoscaling: Optional[AutoscalingOptions] = None
    replica: ReplicaOptions = field(default_factory=ReplicaOptions)
    router: RouterOptions = field(default_factory=RouterOptions)
    ingress: IngressOptions = field(default_factory=IngressOptions)

    def engine_args(self, locate: bool = True) -> EngineArgs:
        """The replica's EngineArgs. ``engine.download_dir`` / ``engine.revision`` (vLLM's) find
        a repo id's snapshot in that Hugging Face cache here, on the node this runs on (a
        replica; ``locate=False``: the head, which checks the config only and may hold no
        weights)."""
        engine = dict(self.engine)
        download_dir, revision = engine.pop("download_dir", None), engine.pop("revision", None)
        model = self.model
        if locate and (download_dir or revision):
            from tessellm.entrypoints.vllm_args import locate_model

            model = locate_model(model, download_dir, revision)
        return EngineArgs(model=model, **engine)

    def server_config(self) -> ServerConfig:
        server = dict(self.server)
        names = server.pop("served_model_names", None)
        if isinstance(names, str):
            names = [names]
        if not names:
            from tessellm.entrypoints.engine_args import DEFAULT_SERVED_NAME

            names = [self.engine.get("served_model_name") or self.model or DEFAULT_SERVED_NAME]
        keys = server.pop("api_key", None)  # a list: vLLM's --api-key K1 K2, any of them
        keys = [] if keys is None else [keys] if isinstance(keys, str) else list(keys)
        extra = server.pop("extra_api_keys", ())
        keys += [extra] if isinstance(extra, str) else list(extra or ())
        if not all(isinstance(k, str) and k for k in keys):
            raise ValueError("server.api_key: each key must be a non-empty string (a list of "
                             "them accepts any one).")
        if server.get("tool_parser_plugin") or server.get("tool_call_parser"):  # as tessellm serve checks them
            from tessellm.entrypoints.openai.tool_parsers import checked_tool_parser

            server["tool_parser_plugin"] = checked_tool_parser(server.get("tool_call_parser"),
                                                               server.get("tool_parser_plugin"))
        return ServerConfig(served_model_names=list(names), api_key=keys[0] if keys else None,
                            extra_api_keys=tuple(keys[1:]), **server)

    def replica_actor_options(self) -> dict:
        """``ray_actor_options`` for an engine replica: CPUs, and the accelerator its backend uses."""
        device = self.engine.get("device", "auto")
        num_cpus = self.replica.num_cpus
        opts: dict[str, Any] = {"num_cpus": 1.0 if num_cpus is None else num_cpus}
        if self.replica.num_gpus is not None or self.replica.resources:
            auto = {}
        elif device in _BACKEND_RESOURCES:
            auto = _BACKEND_RESOURCES[device]
        elif device == "auto":
            raise ValueError("engine.device is 'auto', but a Ray replica must say which accelerator "
                             "it needs before it starts; set engine.device (cpu, cuda, rocm, xpu, tpu) "
                             "or replica.num_gpus / replica.resources.")
        else:
            raise ValueError(f"engine.device {device!r} is a plugin backend; tell Ray which resource "
                             "its replicas need with replica.resources (e.g. {\"NPU\": 1}) or "
                             "replica.num_gpus.")
        # A replica's engine runs one worker process per device (tensor x pipeline parallel,
        # the mp executor): the replica holds all of its devices.
        world = self.world_size()
        num_gpus = self.replica.num_gpus if self.replica.num_gpus is not None \
            else auto.get("num_gpus", 0) * world
        if num_gpus:
            opts["num_gpus"] = num_gpus
        resources = {**{k: v * world for k, v in auto.get("resources", {}).items()},
                     **self.replica.resources}
        if resources:
            opts["resources"] = resources
        if self.replica.env_vars:
            opts["runtime_env"] = {"env_vars": {k: str(v) for k, v in self.replica.env_vars.items()}}
        return opts

    def world_size(self) -> int:
        """Devices one replica's engine uses (tensor_parallel_size x pipeline_parallel_size)."""
        return (int(self.engine.get("tensor_parallel_size", 1))
                * int(self.engine.get("pipeline_parallel_size", 1)))

    def validate(self, check_resources: bool = True) -> None:
        if self.engine.get("distributed_executor_backend") == "ray":
            raise ValueError("engine.distributed_executor_backend 'ray' inside a Ray Serve replica "
                             "is not supported: leave it unset (mp), and the replica holds all "
                             "tensor_parallel_size x pipeline_parallel_size devices of its engine.")
        if int(self.engine.get("data_parallel_size", 1)) > 1:
            raise ValueError(f"engine.data_parallel_size {self.engine['data_parallel_size']} runs "
                             "engine cores on one host, inside one replica; on Ray Serve scale out "
                             "with num_replicas (--num-replicas) instead (docs/ray_serve.md).")
        try:
            self.engine_args(locate=False).validate()
        except (ValueError, TypeError) as exc:
            raise ValueError(f"In the config's engine section: {exc}") from None
        self.server_config()
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {self.num_replicas}.")
        a = self.autoscaling
        if a is not None and not (0 <= a.min_replicas <= a.max_replicas and a.max_replicas >= 1):
            raise ValueError(f"autoscaling needs 0 <= min_replicas <= max_replicas and max_replicas >= 1; "
                             f"got min {a.min_replicas}, max {a.max_replicas}.")
        if a is not None and a.target_ongoing_requests <= 0:
            raise ValueError("autoscaling.target_ongoing_requests must be > 0, "
                             f"got {a.target_ongoing_requests}.")
        r = self.router
        for name in ("chunk_chars", "chunk_tokens", "max_chunks", "max_entries_per_replica"):
            if getattr(r, name) < 1:
                raise ValueError(f"router.{name} must be >= 1, got {getattr(r, name)}.")
        if r.imbalance_threshold < 0:
            raise ValueError(f"router.imbalance_threshold must be >= 0, got {r.imbalance_threshold}.")
        if r.balance not in BALANCES:
            raise ValueError(f"router.balance {r.balance!r} is not supported; use load (the engines' "
                             "reported queues) or in_flight (requests in flight at each replica).")
        if not r.load_report_period_s > 0:
            raise ValueError(f"router.load_report_period_s must be > 0, got {r.load_report_period_s}.")
        if self.replica.max_ongoing_requests < 1 or self.ingress.max_ongoing_requests < 1:
            raise ValueError("replica.max_ongoing_requests and ingress.max_ongoing_requests must be >= 1.")
        if self.ingress.num_replicas < 1 or self.ingress.retries < 0:
            raise ValueError("ingress.num_replicas must be >= 1 and ingress.retries >= 0.")
        for name, value in (("replica.num_cpus", self.replica.num_cpus),
                            ("ingress.num_cpus", self.ingress.num_cpus)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 (or unset, to fit the cluster), got {value}.")
        if check_resources:
            self.replica_actor_options()


# -- parsing -------------------------------------------------------------------------------

_SECTIONS = {"replica": ReplicaOptions, "router": RouterOptions, "ingress": IngressOptions,
             "autoscaling": AutoscalingOptions}
_OPEN_SECTIONS = {"engine": EngineArgs, "server": ServerConfig}  # checked against these fields


def parse_config(args: Optional[dict], check_resources: bool = True) -> RayServeConfig:
    """A RayServeConfig from nested and/or dotted keys; ValueError naming any bad key or value.

    ``check_resources=False`` skips deciding Ray resources (replicas parse their part of the
    config with it; where they run was decided when the app was built)."""
    nested = _unflatten(dict(args or {}))
    if "engine" in nested:
        nested["engine"] = _vllm_engine(nested["engine"], nested)
    _check_listener(nested, "")
    if "server" in nested:
        nested["server"] = _vllm_server(nested["server"], nested.get("engine") or {})
    top = {f.name: f for f in dataclasses.fields(RayServeConfig)}
    unknown = sorted(set(nested) - set(top))
    if unknown:
        raise ValueError(f"Unknown tessellm Ray Serve option(s): {', '.join(unknown)}. Known: "
                         f"{', '.join(sorted(top))}.")
    kwargs: dict[str, Any] = {}
    for name, value in nested.items():
        if name in _SECTIONS:
            kwargs[name] = None if value is None else _build(_SECTIONS[name], value, name)
        elif name == "engine":
            source = {k: value.pop(k) for k in _MODEL_SOURCE if value.get(k) is not None}
            kwargs[name] = {**_check_fields(EngineArgs, value, name),
                            **{k: str(v) for k, v in source.items()}}
        elif name in _OPEN_SECTIONS:
            kwargs[name] = _check_fields(_OPEN_SECTIONS[name], value, name)
        elif name == "model":
            kwargs[name] = None if value in (None, "", "null", "None") else str(value)
        else:
            kwargs[name] = _convert(value, int, name)
    if "model" in kwargs.get("engine", {}):
        raise ValueError("Give the model as the top-level 'model' option, not engine.model.")
    config = RayServeConfig(**kwargs)
    config.validate(check_resources)
    return config


_MODEL_SOURCE = ("download_dir", "revision")  # kept in engine: each replica finds the model


def _vllm_engine(value, nested: dict) -> dict:
    """vLLM's engine arguments in the engine section, through the same table as ``tessellm
    serve`` (vllm_args.py): translated to EngineArgs fields, dropped (no effect), or refused
    naming ``engine.KEY`` and the fix. ``download_dir`` / ``revision`` stay (engine_args());
    ``enable_log_requests`` is the server's ``log_requests``. Keys may be spelled with dashes
    (``max-model-len``), as in vLLM's YAML configs."""
    from tessellm.entrypoints.vllm_args import ENGINE_BY_NAME, engine_overrides, refusal

    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, dict):
        raise ValueError(f"Option 'engine' must be a mapping, got {value!r}.")
    fields = {str(k).replace("-", "_"): v for k, v in value.items()}
    values: dict = {}
    for name in [n for n in fields if n in ENGINE_BY_NAME]:
        arg = ENGINE_BY_NAME[name]
        v = _vllm_value(fields.pop(name), arg, f"engine.{name}")
        message = refusal(arg, v, f"engine.{name}: ")
        if message:
            raise ValueError(message)
        values[name] = v
    if values.pop("enable_log_requests", None):  # tessellm serve --enable-log-requests
        server = nested.get("server") or {}
        server = json.loads(server) if isinstance(server, str) else dict(server)
        server.setdefault("log_requests", True)
        nested["server"] = server
    source = {k: values.pop(k) for k in _MODEL_SOURCE if values.get(k) is not None}
    try:
        _, translated = engine_overrides(values, None, fields)  # no download_dir here: no lookup
    except Exception as exc:  # noqa: BLE001 - hf_overrides that is not JSON, under rope_*
        raise ValueError(f"Option 'engine.hf_overrides': {exc}") from None
    return {**fields, **translated, **source}


# `tessellm serve` / vLLM listener flags: on Ray Serve the proxies' http_options, not the app's
_LISTENER = frozenset({"host", "port", "uds", "ssl_keyfile", "ssl_certfile", "ssl_ca_certs",
                       "ssl_cert_reqs", "ssl_ciphers", "ssl_keyfile_password"})


def _check_listener(fields: dict, where: str) -> None:
    listener = sorted(n for n in (str(k).replace("-", "_") for k in fields) if n in _LISTENER)
    if listener:
        raise ValueError(f"{where}{listener[0]}: where Serve listens is its proxies' setting, not the "
                         "application's: set it under http_options in the Serve config file "
                         "(http_options: {host, port, ssl_keyfile, ssl_certfile, ssl_ca_certs}), or "
                         "give `tessellm serve --ray` --host / --port / --ssl-*.")


def _vllm_server(value, engine: dict) -> dict:
    """vLLM's server arguments in the server section, as ``tessellm serve`` takes them: the
    SERVER table of vllm_args.py (no effect: dropped; a value that would change something:
    refused naming ``server.KEY``, as the flag is), vLLM's spellings of ServerConfig fields
    (SERVER_FIELDS: served_model_name, enable_request_id_headers, ...), its CORS flags, and
    chat_template as a file's path (read here, once) or the template's text. Dashes allowed."""
    from tessellm.entrypoints.vllm_args import CORS_FLAGS, SERVER_BY_NAME, SERVER_FIELDS, refusal

    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, dict):
        raise ValueError(f"Option 'server' must be a mapping, got {value!r}.")
    fields = {str(k).replace("-", "_"): v for k, v in value.items()}
    _check_listener(fields, "server.")
    for name in [n for n in fields if n in SERVER_BY_NAME]:
        arg = SERVER_BY_NAME[name]
        v = _vllm_value(fields.pop(name), arg, f"server.{name}")
        message = refusal(arg, v, f"server.{name}: ")
        # (the engine's value as given: a string from `serve run engine.KEY=V`)
        other = arg.same_as and _vllm_value(engine.get(arg.same_as, 1), arg, f"engine.{arg.same_as}")
        if arg.same_as and v is not None and v != other:
            message = (f"server.{name}: {v!r} is not supported by tessellm (a vLLM setting; accepted: "
                       f"engine.{arg.same_as}'s value, {other!r}): {arg.why}.")
        if message:
            raise ValueError(message)
        if arg.kind == "serve":  # the others (noop, neutral, uvicorn's access log) change nothing here
            fields[name] = v
    for name, target in SERVER_FIELDS.items():
        if name in fields:
            if target in fields:
                raise ValueError(f"server.{name} (vLLM's name) and server.{target} are one setting; "
                                 "give one of them.")
            fields[target] = fields.pop(name)
    cors = {n: fields.pop(n) for n in CORS_FLAGS if n in fields}
    if cors:
        if "cors" in fields:
            raise ValueError(f"server.{next(iter(cors))} (vLLM's CORS flags) and server.cors are one "
                             "setting; give one of them.")
        fields["cors"] = _vllm_cors(cors)
    if isinstance(fields.get("chat_template"), str):
        from tessellm.entrypoints.serve import read_chat_template

        fields["chat_template"] = read_chat_template(fields["chat_template"])
    return fields


def _vllm_cors(given: dict) -> Optional[dict]:
    """vLLM's CORS flags (lists as JSON or a,b strings) as ServerConfig.cors, as the CLI makes it."""
    from types import SimpleNamespace

    from tessellm.entrypoints.serve import _cors, _string_list

    values = {"allow_credentials": bool(_convert(given.get("allow_credentials", False), bool,
                                                 "server.allow_credentials"))}
    for name in ("allowed_origins", "allowed_methods", "allowed_headers"):
        value = given.get(name)
        try:
            values[name] = _string_list(value) if isinstance(value, str) else value
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"Option 'server.{name}': {exc}.") from None
    return _cors(SimpleNamespace(**values))


def _vllm_value(value, arg, name: str):
    """A vLLM argument's value given as a string (``serve run engine.swap_space=4``) in its type."""
    if not isinstance(value, str):
        return value
    if arg.nargs:
        return json.loads(value) if value.startswith("[") else value.split(",")
    if arg.type == "json":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"Option {name!r}: {value!r} is not valid JSON.") from None
    return _convert(value, arg.type, name)


def _unflatten(args: dict) -> dict:
    out: dict = {}
    for key, value in args.items():
        parts = str(key).split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"Option {key!r} nests under {part!r}, which is not a section.")
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]].update(value)
        else:
            node[parts[-1]] = value
    return out


def _build(cls, value, section: str):
    return cls(**_check_fields(cls, value, section))


def _check_fields(cls, value, section: str) -> dict:
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, dict):
        raise ValueError(f"Option {section!r} must be a mapping, got {value!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - fields)
    if unknown:
        vllm = (" (or one of vLLM's engine arguments: tessellm/entrypoints/vllm_args.py, "
                "e.g. swap_space, num_gpu_blocks_override, download_dir)") if cls is EngineArgs else \
            (" (or one of vLLM's server arguments: tessellm/entrypoints/vllm_args.py, e.g. "
             "served_model_name, enable_auto_tool_choice, allowed_origins)") if cls is ServerConfig else ""
        raise ValueError(f"Unknown option(s) in {section!r}: {', '.join(unknown)}. Known: "
                         f"{', '.join(sorted(fields))}{vllm}.")
    return {k: _convert(v, hints[k], f"{section}.{k}") for k, v in value.items()}


def _convert(value, hint, name: str):
    """Strings from ``serve run key=value`` to the field's type; other values pass through."""
    if not isinstance(value, str):
        return value
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    target = args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint
    if value.lower() in ("none", "null") and target is not str:
        return None
    try:
        if target is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if target in (int, float):
            return target(value)
        if target in (list, tuple) or typing.get_origin(target) in (list, tuple):
            items = json.loads(value) if value.startswith("[") else value.split(",")  # a,b or ["a"]
            return tuple(items) if target is tuple or typing.get_origin(target) is tuple else items
        if target is dict or typing.get_origin(target) is dict:
            return json.loads(value)
    except (ValueError, json.JSONDecodeError):
        kind = getattr(target, "__name__", target)
        raise ValueError(f"Option {name!r}: cannot read {value!r} as {kind}.") from None
    return value


def config_to_dict(config: RayServeConfig, sections: tuple = ()) -> dict:
    """The config as plain data (what a Serve config file's ``args`` would hold); ``sections``:
    only those top-level keys."""
    out = dataclasses.asdict(config)
    return {k: v for k, v in out.items() if k in sections} if sections else out
