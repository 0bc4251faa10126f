"""vLLM's routes this server does not offer (or offers only when started so): a request for
one is a 404 whose message names the route and what to do instead, not a bare "Not Found"."""

from __future__ import annotations

from typing import Optional

_DEV_MODE = "it is a development route: start the server with TESSELLM_SERVER_DEV_MODE=1 (or vLLM's " \
            "VLLM_SERVER_DEV_MODE=1)"
_PROFILER = "start the server with TESSELLM_TORCH_PROFILER_DIR=DIR (or vLLM's VLLM_TORCH_PROFILER_DIR) " \
            "to profile; the traces land in DIR"

# path -> why it is missing and the fix (one sentence's tail)
MISSING: dict[str, str] = {
    "/sleep": _DEV_MODE, "/wake_up": _DEV_MODE, "/is_sleeping": _DEV_MODE,
    "/reset_prefix_cache": _DEV_MODE, "/load_weights": _DEV_MODE,
    "/start_profile": _PROFILER, "/stop_profile": _PROFILER,
    "/v1/audio/translations": "tessellm does not translate speech; /v1/audio/transcriptions "
                              "transcribes with an audio-language model (Qwen2-Audio)",
    "/collective_rpc": "a server never runs a client-named worker method; offline, LLM.collective_rpc does",
    "/server_info": "GET /debug/stats shows the engine's state and settings",
    "/scale_elastic_ep": "elastic expert parallelism is not supported; restart with the new "
                         "--data-parallel-size",
    "/is_scaling_elastic_ep": "elastic expert parallelism is not supported",
    "/get_tokenizer_info": "POST /tokenize and /detokenize use the served tokenizer",
}


def missing_route_message(path: str, root_path: str = "") -> Optional[str]:
    """The 404's message for one of vLLM's routes that is not offered here (``path`` under the
    app's ``root_path``, if any); None for others."""
    route = path[len(root_path):] if root_path and path.startswith(root_path) else path
    why = MISSING.get(route.rstrip("/") or "/")
    return None if why is None else f"{path} is not offered by this server: {why}."
