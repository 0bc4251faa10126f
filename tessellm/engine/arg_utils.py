"""vLLM's ``vllm.engine.arg_utils`` path: ``from tessellm.engine.arg_utils import EngineArgs,
AsyncEngineArgs`` gives ``tessellm.EngineArgs`` / ``tessellm.AsyncEngineArgs`` (vLLM's argument
names, ``add_cli_args`` / ``from_cli_args``)."""

from tessellm.entrypoints.vllm_engine_args import VllmAsyncEngineArgs as AsyncEngineArgs
from tessellm.entrypoints.vllm_engine_args import VllmEngineArgs as EngineArgs

__all__ = ["EngineArgs", "AsyncEngineArgs"]
