"""Pooling mode: which runner the engine is, and how it pools (``PoolerConfig``).

A decoder-only embedding model (Qwen3-Embedding, gte-Qwen2, e5-mistral) is the same network as
its causal LM; the embedding is its final hidden states (after the last norm) pooled over the
prompt. The runner is chosen as vLLM chooses it:

* ``runner``: ``generate`` | ``pooling`` | ``auto`` (a bare ``*Model`` architecture, which has no
  LM head, pools; anything else generates);
* ``task="embed"`` (vLLM's older spelling) and ``convert="embed"`` both mean ``runner="pooling"``.

How it pools, lowest precedence first: LAST with ``normalize=True`` (decoder embedding models);
the checkpoint's sentence-transformers files (``modules.json`` naming a ``Pooling`` module whose
``config.json`` sets ``pooling_mode_*``, and a ``Normalize`` module or not); then
``pooler_config`` (a dict or its JSON, e.g. ``{"pooling_type": "MEAN"}``), over which
``override_pooler_config`` (vLLM's older name) is laid.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from typing import Optional

from tessellm.json_arg import json_object_arg

logger = logging.getLogger(__name__)

POOLING_TYPES = ("LAST", "MEAN", "CLS")
RUNNERS = ("auto", "generate", "pooling")
_TASKS = {"auto": "auto", "generate": "generate", "embed": "pooling", "embedding": "pooling",
          "encode": "pooling"}
_CONVERTS = ("auto", "none", "embed")
# sentence-transformers' Pooling config key -> our pooling type
_ST_MODES = {"pooling_mode_lasttoken": "LAST", "pooling_mode_mean_tokens": "MEAN",
             "pooling_mode_cls_token": "CLS"}


@dataclass(frozen=True)
class PoolerConfig:
    """How a pooling engine turns a prompt's hidden states into one vector."""

    pooling_type: str = "LAST"  # LAST (the last prompt token), MEAN (over every token), CLS (the first)
    normalize: bool = True  # default for requests that leave PoolingParams.normalize unset
    hidden_size: int = 0  # the pooled vector's length (the model's hidden size)

    @property
    def prefix_caching_ok(self) -> bool:
        """A prefix-cache hit skips the hidden states of the cached tokens: LAST never reads
        them (the last prompt token is always computed, and causal attention makes its state
        the same with or without the hit); MEAN and CLS do, so they run without the cache."""
        return self.pooling_type == "LAST"


def check_runner_args(runner: str, task: Optional[str], convert: str) -> None:
    """EngineArgs.validate's part: known values, and no contradiction between them."""
    if runner not in RUNNERS:
        raise ValueError(f"runner {runner!r} is not supported; use auto, generate or pooling.")
    if task is not None and task not in _TASKS:
        raise ValueError(f"task {task!r} is not supported; use embed (runner='pooling') or generate.")
    if convert not in _CONVERTS:
        raise ValueError(f"convert {convert!r} is not supported; use auto, none or embed.")
    wanted = {v for v in (runner, _TASKS.get(task or "auto"), "pooling" if convert == "embed" else "auto")
              if v != "auto"}
    if len(wanted) > 1:
        raise ValueError(f"runner={runner!r}, task={task!r} and convert={convert!r} disagree; "
                         "give runner='pooling' for an embedding model, or runner='generate'.")


def resolve_runner(args, hf_config) -> str:
    """``generate`` or ``pooling`` for this engine (EngineArgs ``runner`` / ``task`` / ``convert``)."""
    check_runner_args(args.runner, args.task, args.convert)
    for asked in (args.runner, _TASKS.get(args.task or "auto"), "pooling" if args.convert == "embed" else "auto"):
        if asked != "auto":
            break
    bare = is_bare_model(hf_config)
    if asked == "generate" and bare:
        archs = getattr(hf_config, "architectures", None)
        raise ValueError(f"Architecture {archs} is a bare model without an LM head: it can embed but "
                         "not generate; start it with runner='pooling' (--runner pooling).")
    if asked == "auto":
        return "pooling" if bare else "generate"
    return asked


def is_bare_model(hf_config) -> bool:
    """``LlamaModel``, ``Qwen3Model``, ``MistralModel``...: no ``*For*`` head in the name."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    return bool(archs) and all(a.endswith("Model") and "For" not in a for a in archs)


def pooler_config_for(args, source) -> Optional[PoolerConfig]:
    """The engine's PoolerConfig in pooling mode, None when it generates."""
    if resolve_runner(args, source.hf_config) != "pooling":
        return None
    config = PoolerConfig(hidden_size=int(source.hf_config.hidden_size))
    if source.kind == "dir":
        config = replace(config, **sentence_transformers_pooling(source.path))
    for override in (args.pooler_config, args.override_pooler_config):
        config = replace(config, **parse_pooler_override(override))
    return config


def parse_pooler_override(value) -> dict:
    """``pooler_config`` as a dict (given as one or as its JSON); checked key by key."""
    value = json_object_arg(value, "pooler_config", '{"pooling_type": "MEAN", "normalize": true}')
    out = {}
    for key, v in value.items():
        if key == "pooling_type":
            kind = str(v).upper()
            if kind not in POOLING_TYPES:
                raise ValueError(f"pooler_config pooling_type {v!r} is not supported; use "
                                 f"{', '.join(POOLING_TYPES)}.")
            out[key] = kind
        elif key == "normalize":
            if not isinstance(v, bool):
                raise ValueError(f"pooler_config normalize must be true or false, got {v!r}.")
            out[key] = v
        else:
            raise ValueError(f"pooler_config key {key!r} is not supported; tessellm reads "
                             "pooling_type and normalize.")
    return out


def sentence_transformers_pooling(model_dir: str) -> dict:
    """``pooling_type`` / ``normalize`` from a sentence-transformers checkpoint, or {}."""
    modules = _read_json(os.path.join(model_dir, "modules.json"))
    if not isinstance(modules, list):
        return {}
    out: dict = {}
    types = [str(m.get("type", "")) for m in modules if isinstance(m, dict)]
    pooling = next((m for m in modules if isinstance(m, dict)
                    and str(m.get("type", "")).endswith("models.Pooling")), None)
    if pooling is not None:
        st = _read_json(os.path.join(model_dir, pooling.get("path", ""), "config.json")) or {}
        modes = [kind for key, kind in _ST_MODES.items() if st.get(key)]
        if st.get("pooling_mode") in ("lasttoken", "mean", "cls"):
            modes = [{"lasttoken": "LAST", "mean": "MEAN", "cls": "CLS"}[st["pooling_mode"]]]
        if len(modes) == 1:
            out["pooling_type"] = modes[0]
        elif modes or st:
            logger.warning("The sentence-transformers pooling in %s (%s) is not one of LAST, MEAN, "
                           "CLS; pooling LAST unless pooler_config says otherwise.", model_dir, st)
        out["normalize"] = any(t.endswith("models.Normalize") for t in types)
    return out


def _read_json(path: str):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)
