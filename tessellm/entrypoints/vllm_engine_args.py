"""vLLM's ``EngineArgs`` / ``AsyncEngineArgs`` classes (``tessellm.EngineArgs``,
``tessellm.AsyncEngineArgs``): subclasses of tessellm's ``EngineArgs`` whose constructor takes
vLLM's argument names (translated, accepted or refused as ``LLM(...)`` does them:
``vllm_args.vllm_engine_kwargs``), so their objects go wherever tessellm's do
(``AsyncLLM.from_engine_args``, ``dataclasses.replace``, ``isinstance``)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Optional

from tessellm.config import EngineArgs
from tessellm.entrypoints.vllm_args import vllm_engine_kwargs


class VllmEngineArgs(EngineArgs):
    """``EngineArgs(model=..., **vLLM's or tessellm's names)``. Not a dataclass of its own: the
    fields, ``__eq__``, ``__repr__`` and ``validate`` are tessellm's."""

    def __init__(self, model: Optional[str] = None, **kwargs):
        super().__init__(**vllm_engine_kwargs(model, **kwargs))

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """vLLM's: ``--model`` and every engine flag (tessellm's and vLLM's names) on ``parser``."""
        from tessellm.entrypoints.engine_args import add_engine_arguments

        parser.add_argument("--model", default=None, help="The model: a directory, a .gguf file, or "
                            "a Hugging Face repo id already in the local cache.")
        return add_engine_arguments(parser)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "VllmEngineArgs":
        """vLLM's: the engine arguments of flags parsed by ``add_cli_args``'s parser."""
        from tessellm.entrypoints.engine_args import engine_args_from

        base = engine_args_from(args, getattr(args, "model", None))
        return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})


class VllmAsyncEngineArgs(VllmEngineArgs):
    """vLLM's ``AsyncEngineArgs`` (``AsyncLLMEngine.from_engine_args`` takes either)."""
