"""``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (vLLM's paths and bodies).

Behind the API key like every inference route; refused unless the server was started with
``--allow-runtime-lora-updating``. A bad adapter is a 400 naming the problem; the server
keeps serving (it is read in a thread, never on the event loop nor in the engine core).
"""

from __future__ import annotations

from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict

from tessellm.entrypoints.openai.errors import OpenAIError, bad_request
from tessellm.entrypoints.openai.serving import parse_request


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_int_id: Optional[int] = None


def add_lora_routes(app: FastAPI, engine, config, read_body) -> None:
    def check_allowed():
        if config.lora is None:
            raise bad_request("This server runs without LoRA; start it with --enable-lora.")
        if not config.lora.allow_runtime_updating:
            raise bad_request("Loading and unloading LoRA adapters at run time is off; start the "
                              "server with --allow-runtime-lora-updating.")

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        check_allowed()
        req = parse_request(LoadLoRAAdapterRequest, await read_body(request))
        try:
            await engine.run_off_loop(config.lora.add, req.lora_name, req.lora_path)
        except ValueError as exc:
            raise bad_request(str(exc), "lora_path", "invalid_lora_adapter") from None
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        check_allowed()
        req = parse_request(UnloadLoRAAdapterRequest, await read_body(request))
        try:
            lora = config.lora.remove(req.lora_name)
        except KeyError:
            raise OpenAIError(f"The LoRA adapter '{req.lora_name}' is not loaded.", 404,
                              "lora_name", "model_not_found") from None
        engine.remove_lora(lora.lora_int_id)  # its slot and cached weights (ids are never reused)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")


def serve_lora(engine, config) -> None:
    """With ``--enable-lora``: the served adapters, starting with ``--lora-modules`` (each read
    and checked now; a bad one stops the start with its error)."""
    if not getattr(engine.args, "enable_lora", False):
        if config.lora_modules:
            raise ValueError("--lora-modules needs --enable-lora.")
        return
    from tessellm.entrypoints.openai.lora_modules import LoRAModules

    config.lora = LoRAModules(config.model_name, engine.info.model_path, engine.args.max_lora_rank,
                              config.allow_runtime_lora_updating, engine.args)
    from tessellm.entrypoints.openai.lora_modules import parse_lora_modules

    for name, path in parse_lora_modules(config.lora_modules):
        config.lora.add(name, path)
