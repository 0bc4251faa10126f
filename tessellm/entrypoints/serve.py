"""``tessellm serve`` (the OpenAI-compatible server) and ``tessellm generate`` (one prompt, streamed).

The CLI calls ``add_serve_arguments`` / ``run_serve`` and ``add_generate_arguments`` /
``run_generate``. ``python -m tessellm.entrypoints.serve [serve|generate] ...`` runs them too.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import sys
import time
from typing import Optional

from tessellm.entrypoints.chat_utils import CONTENT_FORMATS
from tessellm.entrypoints.openai.tool_parsers import TOOL_PARSERS, checked_tool_parser
from tessellm import envs
from tessellm.entrypoints.engine_args import (DEFAULT_SERVED_NAME, add_engine_arguments,  # noqa: F401
                                           engine_args_from)
from tessellm.entrypoints.vllm_args import add_vllm_server_arguments, check_parsed_vllm_args, parsed_vllm_args
from tessellm.entrypoints.interrupt import CTRL_C_EXIT, ctrl_c_handled

logger = logging.getLogger("tessellm.serve")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # a Hugging Face repo id: org/name


# -- arguments -----------------------------------------------------------------------------
# The engine flags come from one definition (tessellm/entrypoints/engine_args.py).

def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("model", nargs="?", default=None,
                        help="model directory, .gguf file or cached HF repo id (default: bundled SmolLM2)")
    add_engine_arguments(parser)
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", nargs="+", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY', any of the keys given "
                   "(default: $TESSELLM_API_KEY; none: no key needed)")
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients use for the model (default: MODEL as given)")
    g.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template file overriding the tokenizer's")
    g.add_argument("--chat-template-content-format", default="auto", choices=CONTENT_FORMATS,
                   help="how a message's content reaches the template (vLLM's): string (text parts "
                        "joined), openai (a list of parts), auto (detected from the template)")
    g.add_argument("--tool-call-parser", default=None, metavar="{" + ",".join(sorted(TOOL_PARSERS)) + "}",
                   help="parses tool calls out of the model's text for tool_choice 'auto' "
                        "(docs/structured_output.md); openai: gpt-oss's harmony format, chosen by "
                        "itself for a gpt-oss model; a --tool-parser-plugin file adds names")
    g.add_argument("--uvicorn-log-level", default="info",
                   choices=["trace", "debug", "info", "warning", "error", "critical"])
    g.add_argument("--no-access-log", action="store_true", help="no log line per HTTP request")
    g.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM / Ctrl-C, refuse new requests (503) and let those in flight finish for at "
                   "most this long, then exit (keep Kubernetes' terminationGracePeriodSeconds above it)")
    g = parser.add_argument_group("limits")
    g.add_argument("--max-n", type=int, default=16, help="most samples per request (n)")
    g.add_argument("--max-logprobs", type=int, default=20,
                   help="most logprobs / top_logprobs / prompt_logprobs per token; -1: no limit "
                        "(a request's -1, the whole vocabulary, counts as the vocabulary's size)")
    g.add_argument("--max-tokens-limit", type=int, default=None,
                   help="most output tokens per request (default: the context length)")
    g.add_argument("--max-prompts", type=int, default=64, help="most prompts in one completions request")
    g.add_argument("--max-request-body-bytes", "--max-body-bytes", dest="max_body_bytes", type=int,
                   default=4 << 20, help="largest request body; a larger one is answered 413 before "
                   "it is parsed (default: 4 MiB)")
    g.add_argument("--max-header-bytes", type=int, default=32 << 10, help="largest request headers")
    g.add_argument("--sse-keepalive", type=float, default=10.0, metavar="SECONDS",
                   help="send an SSE comment after this much silence on a stream")
    g.add_argument("--responses-store-size", type=int, default=0, metavar="N",
                   help="keep the last N /v1/responses responses in memory for previous_response_id and "
                   "GET /v1/responses/{id} (default 0: none kept)")
    g = parser.add_argument_group("LoRA (with --enable-lora; docs/lora.md)")
    g.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                   help="PEFT adapters to serve (NAME=PATH, or vLLM's JSON '{\"name\": NAME, "
                        "\"path\": PATH}'); a request selects one with model: NAME")
    g.add_argument("--allow-runtime-lora-updating", action="store_true",
                   help="allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter")
    g.add_argument("--lora-dtype", type=_lora_dtype, default="auto",
                   help="vLLM's; only auto: adapters run in the model's dtype (--dtype)")
    g.add_argument("--fully-sharded-loras", action="store_true",
                   help="vLLM's; accepted, no effect: under tensor parallelism each adapter is "
                        "already sharded like its base layer (docs/lora.md)")
    g = parser.add_argument_group("vLLM command-line compatibility (scripts written for `vllm serve`)")
    g.add_argument("--model", dest="model_flag", default=None, metavar="MODEL",
                   help="the model, as the positional MODEL (vLLM's older form)")
    g.add_argument("--response-role", default="assistant",
                   help="the role of a chat reply after a generation prompt (default: assistant)")
    g.add_argument("--return-tokens-as-token-ids", action="store_true",
                   help="logprobs name tokens 'token_id:{id}' unless a request sets "
                        "return_tokens_as_token_ids itself")
    g.add_argument("--default-chat-template-kwargs", type=_json_object, default=None, metavar="JSON",
                   help="chat template variables under each request's chat_template_kwargs, e.g. "
                        "'{\"enable_thinking\": false}'")
    g.add_argument("--trust-request-chat-template", action="store_true",
                   help="use a request's chat_template field (else it is a 400)")
    g.add_argument("--root-path", default="", help="the path prefix a proxy in front leaves on "
                   "requests (/PREFIX/v1/... is served as /v1/...)")
    g.add_argument("--allowed-origins", type=_string_list, default=None, metavar="JSON",
                   help="CORS: origins that browsers may call from, e.g. '[\"*\"]' (default: no CORS "
                        "headers; vLLM's default is [\"*\"])")
    g.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    g.add_argument("--allowed-methods", type=_string_list, default=None, metavar="JSON",
                   help="CORS: allowed methods (default with CORS on: all)")
    g.add_argument("--allowed-headers", type=_string_list, default=None, metavar="JSON",
                   help="CORS: allowed headers (default with CORS on: all)")
    g.add_argument("--middleware", action="append", default=[], metavar="MODULE.NAME",
                   help="an ASGI middleware class or an http middleware function to add (repeatable)")
    g.add_argument("--enable-request-id-headers", action="store_true",
                   help="responses carry X-Request-Id (the request's own, else a new one)")
    g.add_argument("--enable-prompt-tokens-details", action="store_true",
                   help="usage carries prompt_tokens_details.cached_tokens (prefix-cache hits)")
    g.add_argument("--enable-force-include-usage", action="store_true",
                   help="every stream ends with a usage chunk, as with stream_options.include_usage")
    g.add_argument("--uds", default=None, metavar="PATH",
                   help="listen on this Unix domain socket instead of --host/--port")
    g.add_argument("--log-config-file", default=None, metavar="FILE.json",
                   help="a JSON logging.config.dictConfig for tessellm's and uvicorn's loggers")
    g.add_argument("--ssl-keyfile", default=None, help="HTTPS: the private key file")
    g.add_argument("--ssl-certfile", default=None, help="HTTPS: the certificate file")
    g.add_argument("--ssl-ca-certs", default=None, help="HTTPS: CA certificates to verify clients with")
    g.add_argument("--ssl-cert-reqs", type=int, default=0,
                   help="HTTPS: client certificates: 0 none, 1 optional, 2 required (Python's ssl.CERT_*)")
    g.add_argument("--ssl-ciphers", default=None, help="HTTPS: cipher suites (TLS 1.2 and below)")
    add_vllm_server_arguments(parser)  # the others (--trust-remote-code ...: the engine group's)
    from tessellm.entrypoints.ray_serve.launch import add_ray_arguments

    add_ray_arguments(parser)
    return parser


def _json_object(value: str) -> dict:
    import json

    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("give a JSON object, e.g. '{\"enable_thinking\": false}'")
    return parsed


def _string_list(value: str) -> list:
    """vLLM's JSON list ('["https://a.example", "https://b.example"]'), or comma-separated."""
    import json

    if value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None
        if not all(isinstance(v, str) for v in parsed):
            raise argparse.ArgumentTypeError("give a JSON list of strings")
        return parsed
    return [v.strip() for v in value.split(",") if v.strip()]


def _lora_dtype(value: str) -> str:
    if value != "auto":
        raise argparse.ArgumentTypeError(f"{value!r}: adapters run in the model's dtype (set it "
                                         "with --dtype); give auto or leave it out")
    return value


def resolve_model_flag(args: argparse.Namespace) -> None:
    """``--model X`` (vLLM's older form) is the positional MODEL; both, and different: an error."""
    flag = getattr(args, "model_flag", None)
    if flag is None:
        return
    if args.model is not None and args.model != flag:
        raise SystemExit(f"tessellm serve: the model is given twice ({args.model!r} and --model "
                         f"{flag!r}); give it once.")
    args.model = flag


def add_generate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("prompt", help="the prompt (with --chat, the user's message)")
    parser.add_argument("--model", default=None, help="model (default: bundled SmolLM2)")
    add_engine_arguments(parser)
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="apply the chat template (default: when the tokenizer has one)")
    g.add_argument("--system", default=None, help="a system message (with --chat)")
    g.add_argument("--chat-template", default=None, metavar="FILE")
    g.add_argument("--image", action="append", default=None, metavar="FILE",
                   help="an image for a vision model (repeatable; without --chat, put <image> in the "
                        "prompt where each goes; docs/multimodal.md)")
    g.add_argument("--audio", action="append", default=None, metavar="FILE",
                   help="an audio file (WAV) for an audio model such as Qwen2-Audio (repeatable; "
                        "without --chat, put <|AUDIO|> in the prompt where each goes)")
    g.add_argument("-v", "--verbose", action="store_true", help="show engine logs")
    return parser


# -- serve ---------------------------------------------------------------------------------

def run_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(args, "log_level", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        log_config = apply_log_config(getattr(args, "log_config_file", None))
    except ValueError as exc:
        print(f"tessellm serve: {exc}", file=sys.stderr)
        return 2
    resolve_model_flag(args)
    if getattr(args, "ray", False):
        return _run_ray_serve(args)
    if not getattr(args, "emulate", False):
        return _serve(args, log_config)
    # This process's log lines and /version say so while the server lives, and no longer: a
    # later engine in the same process (a test's) logs unprefixed.
    from tessellm.backends.emulation import mark_emulated, unmark_emulated

    mark_emulated(args.device)
    try:
        return _serve(args, log_config)
    finally:
        unmark_emulated(args.device)


def _serve(args: argparse.Namespace, log_config: Optional[dict]) -> int:
    """The OpenAI server on this host: bind, start the engine, run uvicorn until stopped."""
    from tessellm.core.engine_process import EngineStartupError
    from tessellm.entrypoints.async_llm import AsyncLLM
    from tessellm.entrypoints.openai.api_server import build_app

    try:
        config = _server_config(args)
        ssl = _ssl_options(args)
        sock = bind_uds(args.uds) if getattr(args, "uds", None) else _bind(args.host, args.port)
    except (ValueError, OSError) as exc:
        print(f"tessellm serve: {exc}", file=sys.stderr)
        return 2
    try:
        engine = AsyncLLM(engine_args_from(args, args.model))
    except (EngineStartupError, ValueError) as exc:
        _close_listener(sock, getattr(args, "uds", None))
        print(f"tessellm serve: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C while the engine starts (its core is stopped): the --uds file too
        _close_listener(sock, getattr(args, "uds", None))
        raise
    try:
        app = build_app(engine, config)
    except ValueError as exc:  # a bad --lora-modules adapter
        engine.close()
        _close_listener(sock, getattr(args, "uds", None))
        print(f"tessellm serve: {exc}", file=sys.stderr)
        return 1
    import uvicorn

    where = sock.getsockname()
    where = f"unix:{where}" if isinstance(where, str) else f"{'https' if ssl else 'http'}://{where[0]}:{where[1]}"
    logger.info("Serving %s on %s (API key %s)", config.model_name, where,
                "required" if config.api_key else "not required")
    from tessellm.entrypoints.openai.lifecycle import draining_server

    server = draining_server(uvicorn.Config(
        app, log_level=args.uvicorn_log_level, access_log=not args.no_access_log, timeout_graceful_shutdown=5,
        h11_max_incomplete_event_size=2 * config.max_header_bytes + 8192, **ssl,
        **({"log_config": log_config} if log_config else {})),
        app.state.lifecycle,
        args.shutdown_timeout)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # a second Ctrl-C, re-raised by uvicorn once it stopped
        return ctrl_c_handled()
    finally:
        if not engine.is_dead:
            engine.close()
        _close_listener(sock, getattr(args, "uds", None))
    # Ctrl-C ends as one does (130), after the same drain and shutdown as SIGTERM's (0).
    return CTRL_C_EXIT if app.state.lifecycle.stopped_by == signal.SIGINT else 0


def _run_ray_serve(args: argparse.Namespace) -> int:
    """``--ray``: the same app on Ray Serve replicas (tessellm/entrypoints/ray_serve/)."""
    if getattr(args, "data_parallel_size", 1) > 1:
        print("tessellm serve --ray: --data-parallel-size runs engine cores on one host; on Ray "
              "Serve scale out with --num-replicas instead (docs/ray_serve.md).", file=sys.stderr)
        return 2
    try:
        from tessellm.entrypoints.ray_serve.launch import run_ray_serve

        return run_ray_serve(args, _server_config(args))
    except ImportError as exc:
        print(f"tessellm serve --ray: {exc}; install Ray Serve with `pip install -e \".[ray]\"`.",
              file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"tessellm serve --ray: {exc}", file=sys.stderr)
        return 2


def apply_log_config(path: Optional[str]) -> Optional[dict]:
    """vLLM's --log-config-file: a JSON ``logging.config.dictConfig`` for tessellm's loggers and
    uvicorn's; applied now (the engine core process keeps its own logging)."""
    if not path:
        return None
    import json
    import logging.config

    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        logging.config.dictConfig(config)
    except OSError as exc:
        raise ValueError(f"--log-config-file {path}: {exc.strerror}.") from None
    except (json.JSONDecodeError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"--log-config-file {path} is not a JSON logging dictConfig ({exc}).") from None
    return config


def _ssl_options(args: argparse.Namespace) -> dict:
    """uvicorn's HTTPS settings from vLLM's --ssl-* flags (none: plain HTTP)."""
    if not getattr(args, "ssl_certfile", None):
        if getattr(args, "ssl_keyfile", None):
            raise ValueError("--ssl-keyfile needs --ssl-certfile too.")
        return {}
    for flag in ("ssl_keyfile", "ssl_certfile", "ssl_ca_certs"):
        path = getattr(args, flag)
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"--{flag.replace('_', '-')} {path!r} is not a file.")
    return {"ssl_keyfile": args.ssl_keyfile, "ssl_certfile": args.ssl_certfile,
            "ssl_ca_certs": args.ssl_ca_certs, "ssl_cert_reqs": args.ssl_cert_reqs,
            **({"ssl_ciphers": args.ssl_ciphers} if args.ssl_ciphers else {})}


def _cors(args: argparse.Namespace) -> Optional[dict]:
    """CORSMiddleware's settings when any CORS flag is given (vLLM's names; unset ones "*")."""
    given = [getattr(args, n, None) for n in ("allowed_origins", "allowed_methods", "allowed_headers")]
    if all(v is None for v in given) and not getattr(args, "allow_credentials", False):
        return None
    origins, methods, headers = (v if v is not None else ["*"] for v in given)
    return {"allow_origins": origins, "allow_methods": methods, "allow_headers": headers,
            "allow_credentials": args.allow_credentials}


def _server_config(args: argparse.Namespace):
    from tessellm.entrypoints.openai.lora_modules import parse_lora_modules
    from tessellm.entrypoints.openai.server_config import ServerConfig

    names = args.served_model_name or [args.model if args.model is not None else DEFAULT_SERVED_NAME]
    keys = list(args.api_key or ([envs.api_key()] if envs.api_key() else []))
    vllm = parsed_vllm_args(args)  # --enable-log-requests, ... (vllm_args.py)
    check_parsed_vllm_args(args)  # --data-parallel-size-local: -dp's value only
    plugin = checked_tool_parser(args.tool_call_parser, vllm.get("tool_parser_plugin"))
    if vllm.get("max_log_len") is not None and vllm["max_log_len"] < 0:
        raise ValueError(f"--max-log-len must be >= 0, got {vllm['max_log_len']}.")
    if any(not k for k in keys):
        raise ValueError("--api-key: a key may not be empty.")
    for key in keys[1:]:  # --api-key takes every word after it, as vLLM's
        if os.path.exists(key) or key.endswith(".gguf"):
            raise ValueError(f"--api-key took {key!r} as a key, but it names a file; put MODEL before "
                             "--api-key (which takes every word after it).")
        if args.model is None and _REPO_ID.fullmatch(key):  # else the bundled model, under its name
            raise ValueError(f"--api-key took {key!r} as a key, but no MODEL was given and it reads as "
                             "a model's repo id; put MODEL before --api-key (which takes every word "
                             "after it).")
    flags = {"max_body_bytes": "max-request-body-bytes"}
    for name in ("max_n", "max_logprobs", "max_prompts", "max_body_bytes", "max_header_bytes"):
        if getattr(args, name) < 1 and not (name == "max_logprobs" and args.max_logprobs == -1):
            flag = flags.get(name, name.replace("_", "-"))
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, name)}.")
    if args.max_tokens_limit is not None and args.max_tokens_limit < 1:
        raise ValueError(f"--max-tokens-limit must be >= 1, got {args.max_tokens_limit}.")
    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0 seconds, got {args.shutdown_timeout}.")
    if args.responses_store_size < 0:
        raise ValueError(f"--responses-store-size must be >= 0, got {args.responses_store_size}.")
    if args.sse_keepalive <= 0:
        raise ValueError(f"--sse-keepalive must be > 0 seconds, got {args.sse_keepalive}.")
    return ServerConfig(
        served_model_names=list(names), api_key=keys[0] if keys else None, extra_api_keys=tuple(keys[1:]),
        chat_template=read_chat_template(args.chat_template), max_n=args.max_n,
        chat_template_content_format=getattr(args, "chat_template_content_format", "auto"),
        max_logprobs=args.max_logprobs, max_tokens=args.max_tokens_limit, max_prompts=args.max_prompts,
        max_body_bytes=args.max_body_bytes, max_header_bytes=args.max_header_bytes,
        sse_keepalive_s=args.sse_keepalive, tool_call_parser=args.tool_call_parser, tool_parser_plugin=plugin,
        responses_store_size=args.responses_store_size,
        lora_modules=parse_lora_modules(getattr(args, "lora_modules", None)),
        allow_runtime_lora_updating=getattr(args, "allow_runtime_lora_updating", False),
        response_role=getattr(args, "response_role", "assistant"),
        return_tokens_as_token_ids=getattr(args, "return_tokens_as_token_ids", False),
        default_chat_template_kwargs=getattr(args, "default_chat_template_kwargs", None),
        trust_request_chat_template=getattr(args, "trust_request_chat_template", False),
        root_path=_root_path(getattr(args, "root_path", "")), cors=_cors(args),
        middleware=list(getattr(args, "middleware", None) or []),
        request_id_headers=getattr(args, "enable_request_id_headers", False),
        prompt_tokens_details=getattr(args, "enable_prompt_tokens_details", False),
        force_include_usage=getattr(args, "enable_force_include_usage", False),
        log_requests=bool(vllm.get("enable_log_requests")), log_outputs=bool(vllm.get("enable_log_outputs")),
        max_log_len=vllm.get("max_log_len"),
        exclude_tools_when_tool_choice_none=bool(vllm.get("exclude_tools_when_tool_choice_none")))


def _root_path(value: str) -> str:
    value = (value or "").rstrip("/")
    if value and not value.startswith("/"):
        raise ValueError(f"--root-path must start with '/', got {value!r}.")
    return value


def read_chat_template(value: Optional[str]) -> Optional[str]:
    """--chat-template: a file's text; inline Jinja text is accepted too."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template {value!r} is not a file; give the path of a Jinja template file.")


def bind_uds(path: str) -> socket.socket:
    """vLLM's --uds: listen on a Unix domain socket (a stale socket file there is replaced)."""
    import stat

    if os.path.exists(path):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise OSError(f"--uds {path} exists and is not a socket; give another path.")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on --uds {path}: {exc.strerror}.") from None
    os.chmod(path, 0o666)  # as uvicorn's own --uds does: any local user may connect
    sock.set_inheritable(True)
    return sock


def _close_listener(sock: socket.socket, uds: Optional[str]) -> None:
    """Closes the listening socket (uvicorn may have already); the --uds socket file goes too."""
    import stat

    sock.close()
    if uds and os.path.exists(uds) and stat.S_ISSOCK(os.stat(uds).st_mode):
        os.unlink(uds)


def _bind(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so a busy port fails at once, not after the load."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}; pick another --port.") from None
    sock.set_inheritable(True)
    return sock


# -- generate ------------------------------------------------------------------------------

def run_generate(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("tessellm").setLevel(logging.INFO if args.verbose else logging.WARNING)
    from tessellm.core.llm_engine import LLMEngine
    from tessellm.core.sampling_params import SamplingParams
    from tessellm.entrypoints.chat_utils import render_chat
    from tessellm.multimodal.chat import chat_prompt_with_images
    from tessellm.multimodal.media import load_image_file

    try:
        engine = LLMEngine(engine_args_from(args, args.model))
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                max_tokens=args.max_tokens, stop=args.stop, seed=args.seed)
        prompt = args.prompt
        tokenizer = engine.tokenizer
        use_chat = args.chat if args.chat is not None else bool(tokenizer and tokenizer.chat_template)
        images = [load_image_file(path) for path in args.image or ()]
        clips = [audio_file_part(path) for path in args.audio or ()]
        if images and clips:
            raise ValueError("--image and --audio do not combine (no served model takes both); give one.")
        if use_chat:
            messages = ([{"role": "system", "content": args.system}] if args.system else [])
            content = ([{"type": "image_pil", "image_pil": im} for im in images] + clips
                       + [{"type": "text", "text": args.prompt}]) if images or clips else args.prompt
            messages.append({"role": "user", "content": content})
            template = read_chat_template(args.chat_template)

            def render(conv):
                return render_chat(tokenizer, conv, True, template)

            prompt = (chat_prompt_with_images(messages, engine.core.info, tokenizer, render)
                      or {"prompt_token_ids": render(messages)})
        elif clips:
            from tessellm.multimodal.audio import load_input_audio

            prompt = {"prompt": prompt, "multi_modal_data": {
                "audio": [load_input_audio(c["input_audio"]) for c in clips]}}
        elif images:
            prompt = {"prompt": prompt, "multi_modal_data": {"image": images}}
        engine.add_request("generate", prompt, params)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        if envs.debug():  # TESSELLM_DEBUG=1: the whole traceback
            raise
        print(f"tessellm generate: {exc}", file=sys.stderr)
        return 1
    return _stream_to_terminal(engine)


def audio_file_part(path: str) -> dict:
    """``--audio FILE`` as an ``input_audio`` chat part (decoded as the server decodes one)."""
    import base64

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ValueError(f"Audio {path} could not be read: {exc.strerror}.") from None
    fmt = os.path.splitext(path)[1].lstrip(".").lower() or "wav"
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def _stream_to_terminal(engine) -> int:
    printed, num_tokens, t0 = 0, 0, time.perf_counter()
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                text = out.outputs[0].text
                sys.stdout.write(text[printed:])
                sys.stdout.flush()
                printed, num_tokens = len(text), len(out.outputs[0].token_ids)
    except KeyboardInterrupt:
        engine.abort_request("generate")
        print()
        return ctrl_c_handled()
    elapsed = time.perf_counter() - t0
    print()
    print(f"[{num_tokens} tokens in {elapsed:.1f}s, {num_tokens / max(elapsed, 1e-9):.1f} tok/s]",
          file=sys.stderr)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C while it starts (imports; serve: the engine's start)
        print("tessellm: interrupted.", file=sys.stderr)
        return ctrl_c_handled()


def _main(argv: Optional[list[str]]) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("serve", "generate") else "serve"
    parser = argparse.ArgumentParser(prog=f"tessellm {command}")
    parser.add_argument("--log-level", default="INFO", help="Python logging level")
    if command == "generate":
        return run_generate(add_generate_arguments(parser).parse_args(argv))
    return run_serve(add_serve_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
