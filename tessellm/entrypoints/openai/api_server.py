"""The OpenAI-compatible FastAPI app.

Routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/responses`` (responses/serving.py; with
``--responses-store-size``, ``GET`` / ``DELETE /v1/responses/{id}`` and ``POST
/v1/responses/{id}/cancel``), ``/v1/embeddings`` (an embedding
engine, ``--runner pooling``: serving_embedding.py), ``/classify`` (a sequence classifier:
serving_classify.py), ``/pooling`` (either, per token too: serving_pooling.py), ``/score``,
``/v1/score``, ``/rerank``, ``/v1/rerank``, ``/v2/rerank`` (a cross-encoder or an embedding model: serving_score.py), ``/v1/models`` (and ``/v1/models/{id}``;
LoRA adapters are listed with their ``parent``), ``/v1/load_lora_adapter`` and
``/v1/unload_lora_adapter`` (lora_routes.py),
``/invocations`` (vLLM's: chat, completion or embedding by the body's shape), ``/load`` (vLLM's:
requests in flight), ``/tokenize``, ``/detokenize``, ``/health`` and ``/ping`` (liveness: the API process and the
engine core process are up), ``/ready`` (the engine has loaded, finished its warm-up and answers, within half a second:
``AsyncLLM.readiness``; 503 with ``Retry-After`` while warming up or draining, see lifecycle.py), ``/version``, ``/metrics``
(Prometheus text, ``tessellm.metrics.prometheus``; one private registry per app) and
``/debug/stats`` (the core's scheduler stats, fresh); with TESSELLM_SERVER_DEV_MODE=1 sleep
mode's ``/sleep``, ``/wake_up``, ``/is_sleeping``, ``/reset_prefix_cache`` and ``/load_weights``
(sleep_routes.py; inference routes answer 503 while the engine sleeps).

Every error is ``{"error": {"message", "type", "param", "code"}}``; validation errors are 400,
never FastAPI's 422. The API key (when set) guards every route except /health, /ping,
/ready, /version and /metrics.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import asynccontextmanager
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException

import tessellm
from tessellm import envs
from tessellm.entrypoints.async_llm import AsyncLLM
from tessellm.entrypoints.openai.errors import OpenAIError, bad_request, from_validation_error, prompt_error
from tessellm.entrypoints.openai.lifecycle import Lifecycle
from tessellm.entrypoints.openai.lora_routes import add_lora_routes, serve_lora
from tessellm.entrypoints.openai.profile_routes import add_profile_routes
from tessellm.entrypoints.openai.sleep_routes import add_sleep_routes, check_awake
from tessellm.entrypoints.openai.vllm_routes import missing_route_message
from tessellm.entrypoints.openai.middleware import EdgeMiddleware, RequestIdHeaderMiddleware
from tessellm.entrypoints.openai.protocol import (DetokenizeRequest, DetokenizeResponse,
                                                  TokenizeChatRequest, TokenizeCompletionRequest,
                                                  TokenizeResponse)
from tessellm.entrypoints.openai.protocol_responses import ModelCard, ModelList
from tessellm.entrypoints.openai.sampling import check_model, merged_template_kwargs
from tessellm.entrypoints.openai.server_config import ServerConfig
from tessellm.entrypoints.openai.responses.serving import (cancel_response, create_response, delete_response,
                                                            not_stored, stream_stored)
from tessellm.entrypoints.openai.responses.store import ResponseStore
from tessellm.entrypoints.openai.serving import parse_request
from tessellm.entrypoints.openai.serving_chat import create_chat_completion, render_messages
from tessellm.multimodal.chat import media_data
from tessellm.entrypoints.openai.serving_classify import create_classification
from tessellm.entrypoints.openai.serving_completion import create_completion
from tessellm.entrypoints.openai.serving_embedding import create_embedding
from tessellm.entrypoints.openai.serving_pooling import create_pooling
from tessellm.entrypoints.openai.serving_score import create_rerank, create_score
from tessellm.metrics.names import engine_metrics_options
from tessellm.metrics.prometheus import EngineMetrics
from tessellm.metrics.stats import EngineStats, merge_engine_stats
from tessellm.pooling.front import check_generates



def build_app(engine: AsyncLLM, config: ServerConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await engine.shutdown()

    app = FastAPI(title="tessellm", version=tessellm.__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None, root_path=config.root_path)
    app.state.engine = engine
    app.state.config = config
    from tessellm.entrypoints.openai.serving import RequestLog

    # --enable-log-requests / --enable-log-outputs (serving.submit and the output paths read it)
    engine.request_log = RequestLog(config.log_requests, config.log_outputs, config.max_log_len)
    app.state.lifecycle = Lifecycle()  # draining on SIGTERM (lifecycle.py)
    app.state.metrics = EngineMetrics(config.model_name, CollectorRegistry(), engine.info.max_model_len,
                                      num_engines=engine.cores.size,
                                      **engine_metrics_options(engine.args, engine.info))
    engine.add_stat_logger(app.state.metrics)
    _add_status_routes(app, engine, app.state.metrics)
    serve_lora(engine, config)  # --enable-lora: reads --lora-modules (ValueError if one is bad)
    _add_inference_routes(app, engine, config)
    add_lora_routes(app, engine, config, _json_body)
    if envs.server_dev_mode():
        add_sleep_routes(app, engine, _json_body)
    if envs.torch_profiler_dir():  # as vLLM: the profiler routes only with a trace directory
        add_profile_routes(app, engine)
    add_error_handling(app, config, app.state.lifecycle)
    add_vllm_middleware(app, config)
    return app


def add_vllm_middleware(app: FastAPI, config: ServerConfig) -> None:
    """vLLM's server options, outside the edge (a CORS preflight needs no API key): --middleware
    (a function: an ``http`` middleware; a class: ASGI middleware), --enable-request-id-headers
    and CORS (--allowed-origins ...)."""
    import importlib
    import inspect

    for path in config.middleware:
        module, _, name = path.rpartition(".")
        try:
            target = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ValueError(f"--middleware {path!r}: cannot import it ({exc}); give module.name of a "
                             "function or an ASGI middleware class.") from None
        if inspect.isclass(target):
            app.add_middleware(target)
        else:
            app.middleware("http")(target)
    if config.request_id_headers:
        app.add_middleware(RequestIdHeaderMiddleware)
    if config.cors is not None:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, **config.cors)


def add_error_handling(app: FastAPI, config: ServerConfig, lifecycle: Lifecycle) -> None:
    """Every error as an OpenAI error object: the handlers of known errors, and the edge
    middleware (limits, API key, draining; an unhandled exception is a 500 there)."""
    _add_error_handlers(app)
    app.add_middleware(EdgeMiddleware, config=config, lifecycle=lifecycle)


async def _json_body(request: Request):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"We could not parse the JSON body of your request ({exc}). The body must "
                          "be a JSON object.", None, "invalid_json") from None


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(_request, exc: OpenAIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc: RequestValidationError):
        return from_validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:  # one of vLLM's routes not offered: say why and the fix
            message = missing_route_message(request.url.path, request.scope.get("root_path", "")) or message
        return OpenAIError(message, exc.status_code).response()
    # Any other exception: a 500 from EdgeMiddleware (middleware.py says why not a handler here).


def _add_status_routes(app: FastAPI, engine: AsyncLLM, metrics: EngineMetrics) -> None:
    @app.get("/health")
    async def health():
        if engine.is_dead or not engine.cores.is_alive():
            reason = engine.dead_reason or engine.cores.dead_core() or "exited"
            raise OpenAIError(f"The engine core is not running ({reason}).", 503)
        return JSONResponse({})

    app.add_api_route("/ping", health, methods=["GET", "POST"])  # vLLM's (SageMaker's) name for it

    @app.get("/ready")
    async def ready():
        if app.state.lifecycle.draining:
            return JSONResponse({"status": "draining", "reason": "shutting down"}, status_code=503,
                                headers={"Retry-After": "5"})
        if not engine.is_dead and not engine.warm:
            return JSONResponse({"status": "warming up", "reason": "the engine is running its warm-up"},
                                status_code=503, headers={"Retry-After": "5"})
        reason = await engine.readiness()  # within half a second: never waits out a step
        if reason is None:
            return JSONResponse({"status": "ready"})
        dead = engine.is_dead or not engine.cores.is_alive()  # for good: no Retry-After
        return JSONResponse({"status": "not ready", "reason": reason},
                            status_code=503, headers={} if dead else {"Retry-After": "5"})

    @app.get("/version")
    async def version():
        from tessellm.backends.emulation import emulated_names

        emulated = emulated_names()
        return {"version": tessellm.__version__, **({"emulated": ",".join(emulated)} if emulated else {})}

    @app.get("/debug/stats")
    async def debug_stats():
        try:
            per_core = await engine.call_all("stats")
        except Exception as exc:  # noqa: BLE001
            raise OpenAIError(f"The engine core did not answer: {exc}", 503) from None
        stats = per_core[0] if len(per_core) == 1 else dataclasses.asdict(
            merge_engine_stats([EngineStats.from_dict(d) for d in per_core]))
        pids, loads, tokens = engine.cores.pids(), engine.cores.loads(), engine.cores.token_loads()
        # One entry per engine core (data parallelism): its stats, pid, the requests the front
        # end has sent it that are not finished and their tokens (what the tokens policy weighs;
        # the load policy weighs the figures the core reports, its stats' "load").
        engines = [{"index": i, "pid": pids[i], "devices": engine.cores.clients[i].info.devices,
                    "num_requests": loads[i], "num_tokens": tokens[i],
                    "requests_sent_total": engine.cores.balancer.sent[i], "stats": per_core[i]}
                   for i in range(len(per_core))]
        return {"stats": stats, "num_requests": len(engine.streams), "engine_pid": pids[0],
                "num_kv_blocks": engine.info.num_kv_blocks, "block_size": engine.info.block_size,
                "warmup": engine.warmup_report, "data_parallel_size": engine.cores.size,
                "data_parallel_balance": engine.cores.balancer.policy, "engines": engines}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=metrics.content_type)


def _check_generates(engine: AsyncLLM) -> None:
    """A 400 for text generation on an embedding engine (``--runner pooling``); a 503 while
    the engine sleeps."""
    check_awake(engine)
    try:
        check_generates(engine.info)
    except ValueError as exc:
        raise bad_request(str(exc), None, "wrong_runner") from None


def _add_inference_routes(app: FastAPI, engine: AsyncLLM, config: ServerConfig) -> None:
    def card(name: str) -> ModelCard:
        lora = config.lora_for(name)
        return ModelCard(id=name, root=lora.lora_path if lora else engine.info.model_path,
                         max_model_len=engine.info.max_model_len, vocab_size=engine.info.vocab_size,
                         parent=config.model_name if lora else None)

    @app.get("/v1/models")
    async def list_models():
        adapters = list(config.lora.adapters) if config.lora is not None else []
        return ModelList(data=[card(n) for n in config.served_model_names + adapters])

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        check_model(model_id, config)
        return card(model_id)

    @app.post("/v1/completions")
    async def completions(request: Request):
        _check_generates(engine)
        return await create_completion(engine, config, await _json_body(request), request)

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):  # audio-language models (Qwen2-Audio)
        from tessellm.entrypoints.openai.serving_transcription import create_transcription

        _check_generates(engine)
        return await create_transcription(engine, config, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        _check_generates(engine)
        return await create_chat_completion(engine, config, await _json_body(request), request)

    responses_store = ResponseStore(config.responses_store_size)  # --responses-store-size (store.py)

    @app.post("/v1/responses")
    async def responses(request: Request):
        _check_generates(engine)
        return await create_response(engine, config, responses_store, await _json_body(request), request)

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str, stream: bool = False, starting_after: Optional[int] = None):
        if stream:  # a background stream's events (vLLM's resume: after starting_after)
            return stream_stored(responses_store, response_id, starting_after, config.sse_keepalive_s)
        stored = responses_store.get(response_id)
        if stored is None:
            raise not_stored(response_id, responses_store)
        return stored.response

    @app.post("/v1/responses/{response_id}/cancel")
    async def cancel_a_response(response_id: str):
        return await cancel_response(responses_store, response_id)

    @app.delete("/v1/responses/{response_id}")
    async def delete_a_response(response_id: str):
        return await delete_response(responses_store, response_id)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        check_awake(engine)
        return await create_embedding(engine, config, await _json_body(request), request)

    @app.post("/pooling")
    async def pooling(request: Request):
        check_awake(engine)
        return await create_pooling(engine, config, await _json_body(request), request)

    @app.post("/classify")
    async def classify(request: Request):
        check_awake(engine)
        return await create_classification(engine, config, await _json_body(request), request)

    async def score(request: Request):
        check_awake(engine)
        return await create_score(engine, config, await _json_body(request), request)

    async def rerank(request: Request):
        check_awake(engine)
        return await create_rerank(engine, config, await _json_body(request), request)

    for path in ("/score", "/v1/score"):
        app.add_api_route(path, score, methods=["POST"])
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        app.add_api_route(path, rerank, methods=["POST"])

    @app.post("/invocations")
    async def invocations(request: Request):
        """vLLM's (SageMaker's) one route: the body's shape picks the endpoint: ``messages`` a
        chat completion (an embedding on a pooling engine), ``prompt`` a completion, ``input``
        an embedding."""
        body = await _json_body(request)
        pooling = getattr(engine.info, "runner", "generate") == "pooling"
        if isinstance(body, dict) and "messages" in body and not pooling:
            _check_generates(engine)
            return await create_chat_completion(engine, config, body, request)
        if isinstance(body, dict) and "prompt" in body and not pooling:
            _check_generates(engine)
            return await create_completion(engine, config, body, request)
        if isinstance(body, dict) and ("input" in body or "messages" in body):
            check_awake(engine)
            return await create_embedding(engine, config, body, request)
        raise bad_request("/invocations takes a chat completion (messages), a completion (prompt) or an "
                          "embedding (input) request body.", None, "invalid_request")

    @app.get("/load")
    async def load():
        """vLLM's: the requests this server is handling now."""
        return {"server_load": app.state.lifecycle.in_flight}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await _json_body(request)
        is_chat = isinstance(body, dict) and "messages" in body
        req = parse_request(TokenizeChatRequest if is_chat else TokenizeCompletionRequest, body)
        check_model(req.model, config)
        if engine.tokenizer is None:
            raise bad_request("This model has no tokenizer.")
        if is_chat:
            tools = [t.model_dump(exclude_none=True) for t in req.tools or []] or None
            images: list = []
            ids = await render_messages(engine, req.messages, req.add_generation_prompt, config.chat_template,
                                        tools, continue_final_message=req.continue_final_message,
                                        template_kwargs=merged_template_kwargs(req.chat_template_kwargs, config),
                                        images=images,
                                        add_special_tokens=req.add_special_tokens,
                                        content_format=config.chat_template_content_format)
            if images:  # the placeholders expanded, as the model sees them
                try:
                    ids = (await engine.process_prompt_async(
                        {"prompt_token_ids": ids, "multi_modal_data": media_data(images)})).prompt_token_ids
                except ValueError as exc:
                    raise prompt_error(exc, "messages") from None
        else:
            ids = await engine.run_off_loop(
                lambda: engine.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens))
        strs = engine.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=engine.info.max_model_len, tokens=ids,
                                token_strs=strs)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = parse_request(DetokenizeRequest, await _json_body(request))
        check_model(req.model, config)
        if engine.tokenizer is None:
            raise bad_request("This model has no tokenizer.")
        bad = [t for t in req.tokens if not 0 <= t < engine.info.vocab_size]
        if bad:
            raise bad_request(f"Token ids must be in [0, {engine.info.vocab_size}); got {bad[0]}.", "tokens")
        return DetokenizeResponse(prompt=engine.tokenizer.decode(req.tokens))
