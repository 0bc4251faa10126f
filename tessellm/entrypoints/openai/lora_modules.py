"""The server's LoRA adapters: names the ``model`` field may take, besides the base model.

An adapter is read and checked here, in the API process (in a thread: the event loop keeps
serving), before its name is accepted, so a bad one is a 400 naming the problem and never
reaches the engine core. The core reads it again off its step loop when a request first
names it (``tessellm.lora.store``). Ids are given out once and never reused.
"""

from __future__ import annotations

import itertools
import threading
from typing import Optional

from tessellm.lora.request import LoRARequest


class LoRAModules:
    def __init__(self, base_name: str, model_path: str, max_rank: int,
                 allow_runtime_updating: bool = False, engine_args=None):
        self.base_name = base_name
        self.model_path = model_path
        self.engine_args = engine_args  # the model as the engine serves it (e.g. images off)
        self.max_rank = max_rank
        self.allow_runtime_updating = allow_runtime_updating
        self.adapters: dict[str, LoRARequest] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._shapes = None

    def get(self, name: Optional[str]) -> Optional[LoRARequest]:
        return self.adapters.get(name) if name is not None else None

    def add(self, name: str, path: str) -> LoRARequest:
        """Check the adapter at ``path`` and serve it as ``name``; ValueError if it is bad."""
        from tessellm.lora.peft import load_adapter

        if not name or not path:
            raise ValueError("Give both lora_name and lora_path.")
        if name == self.base_name or name in self.adapters:
            raise ValueError(f"The model name {name!r} is already served; unload it first or "
                             "pick another name.")
        lora = LoRARequest(name, next(self._ids), path)
        load_adapter(lora, self._base_shapes(), self.max_rank)
        with self._lock:
            if name in self.adapters:
                raise ValueError(f"The model name {name!r} is already served.")
            self.adapters[name] = lora
        return lora

    def remove(self, name: str) -> LoRARequest:
        with self._lock:
            lora = self.adapters.pop(name, None)
        if lora is None:
            raise KeyError(name)
        return lora

    def _base_shapes(self):
        if self._shapes is None:
            from tessellm.config import resolve_model
            from tessellm.lora.shapes import BaseShapes
            from tessellm.pooling.convert import model_source

            # The engine's own config reader: a model directory or a .gguf file; with the
            # engine's arguments, as it serves it (an image-text checkpoint with images off:
            # its language model).
            source = resolve_model(self.model_path) if self.engine_args is None else \
                model_source(self.engine_args)
            self._shapes = BaseShapes.from_config(source.hf_config)
        return self._shapes


def parse_lora_modules(values) -> list[tuple[str, str]]:
    """``--lora-modules name=path ...``, or vLLM's JSON form ``'{"name": ..., "path": ...}'``
    (its ``base_model_name`` is accepted: adapters always apply to the served model), or, from a
    Ray Serve config, ``{name: path}`` or ``[name, path]`` pairs -> [(name, path)]; ValueError
    names a malformed one."""
    if isinstance(values, dict):
        values = list(values.items())
    out = []
    for value in values or ():
        if isinstance(value, str) and value.lstrip().startswith("{"):
            value = _json_module(value)
        if isinstance(value, dict):
            value = _module_fields(value)
        if isinstance(value, (list, tuple)) and len(value) == 2:
            value = f"{value[0]}={value[1]}"
        if not isinstance(value, str):
            raise ValueError(f"lora_modules takes name=path pairs, got {value!r}.")
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules takes name=path pairs, got {value!r}.")
        out.append((name, path))
    return out


def _json_module(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"--lora-modules {text!r} is not valid JSON ({exc}); give name=path or "
                         '\'{"name": "sql", "path": "/adapters/sql"}\'.') from None
    if not isinstance(value, dict):
        raise ValueError(f"--lora-modules {text!r} is not a JSON object.")
    return value


def _module_fields(value: dict) -> tuple[str, str]:
    unknown = set(value) - {"name", "path", "base_model_name"}
    if unknown or not isinstance(value.get("name"), str) or not isinstance(value.get("path"), str):
        raise ValueError(f"--lora-modules takes {{\"name\": ..., \"path\": ...}} (and optionally "
                         f"\"base_model_name\"), got {value!r}.")
    return value["name"], value["path"]
