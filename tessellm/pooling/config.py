"""Pooling mode: which runner the engine is, and how it pools (``PoolerConfig``).

A decoder-only embedding model (Qwen3-Embedding, gte-Qwen2, e5-mistral) is the same network as
its causal LM; the embedding is its final hidden states (after the last norm) pooled over the
prompt. The runner is chosen as vLLM chooses it:

* ``runner``: ``generate`` | ``pooling`` | ``auto`` (a bare ``*Model`` architecture, which has no
  LM head, pools, and so does a ``*ForSequenceClassification``; anything else generates);
* ``task="embed"`` / ``"classify"`` / ``"score"`` (vLLM's older spellings) and ``convert="embed"``
  / ``"classify"`` all mean ``runner="pooling"`` (``convert="classify"`` also turns a
  ``*ForCausalLM`` into its family's classifier: ``tessellm.pooling.convert``).

What a pooling engine does (``PoolerConfig.task``) follows from the architecture: a
``*ForSequenceClassification`` classifies (its ``score`` head's logits, ``num_labels`` of them;
with ``num_labels == 1`` it is a cross-encoder and also scores pairs); anything else embeds.

How it pools, lowest precedence first: LAST with ``normalize=True`` (decoder embedding models;
CLS for an encoder-only model, ``tessellm.pooling.encoder``);
the checkpoint's sentence-transformers files (``modules.json`` naming a ``Pooling`` module whose
``config.json`` sets ``pooling_mode_*``, and a ``Normalize`` module or not); then
``pooler_config`` (a dict or its JSON, e.g. ``{"pooling_type": "MEAN"}``), over which
``override_pooler_config`` (vLLM's older name) is laid. A classifier's ``use_activation`` (vLLM's
name; ``softmax`` and ``activation`` are its deprecated spellings) says whether its logits go
through softmax (sigmoid when ``num_labels == 1``) by default.
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
          "encode": "pooling", "classify": "pooling", "score": "pooling"}
_ACTIVATION_KEYS = ("use_activation", "softmax", "activation")  # vLLM's name, then its deprecated ones
# sentence-transformers' Pooling config key -> our pooling type
_ST_MODES = {"pooling_mode_lasttoken": "LAST", "pooling_mode_mean_tokens": "MEAN",
             "pooling_mode_cls_token": "CLS"}


@dataclass(frozen=True)
class PoolerConfig:
    """How a pooling engine turns a prompt's hidden states into one vector."""

    pooling_type: str = "LAST"  # LAST (the last prompt token), MEAN (over every token), CLS (the first)
    normalize: bool = True  # default for requests that leave PoolingParams.normalize unset
    hidden_size: int = 0  # the pooled vector's length (the model's hidden size)
    task: str = "embed"  # "embed", or "classify": a *ForSequenceClassification's score head
    num_labels: int = 0  # classify: the logits' length (1: a cross-encoder, which also scores)
    labels: tuple[str, ...] = ()  # classify: config.json's id2label in id order ("LABEL_i" if absent)
    use_activation: bool = True  # classify: softmax (sigmoid for one label) unless a request says
    use_sep_token: bool = True  # score: a pair is the tokenizer's text pair; False: one text, q + d
    # An encoder-only model (BERT, XLM-R): attention both ways over each whole prompt, which
    # then runs in one step, without prefix caching (tessellm.pooling.encoder).
    bidirectional: bool = False

    @property
    def prefix_caching_ok(self) -> bool:
        """A prefix-cache hit skips the hidden states of the cached tokens: LAST never reads
        them (the last prompt token is always computed, and causal attention makes its state
        the same with or without the hit); MEAN and CLS do, so they run without the cache.
        Under bidirectional attention a cached key depends on the tokens after it: never."""
        return self.pooling_type == "LAST" and not self.bidirectional


def check_runner_args(runner: str, task: Optional[str], convert: str) -> None:
    """EngineArgs.validate's part: known values, and no contradiction between them."""
    if runner not in RUNNERS:
        raise ValueError(f"runner {runner!r} is not supported; use auto, generate or pooling.")
    if task is not None and task not in _TASKS:
        raise ValueError(f"task {task!r} is not supported; use embed, classify or score "
                         "(runner='pooling'), or generate.")
    from tessellm.pooling.convert import CONVERTS

    if convert not in CONVERTS:
        raise ValueError(f"convert {convert!r} is not supported; use {', '.join(CONVERTS)}.")
    wanted = {v for v in (runner, _TASKS.get(task or "auto"), _convert_runner(convert)) if v != "auto"}
    if len(wanted) > 1:
        raise ValueError(f"runner={runner!r}, task={task!r} and convert={convert!r} disagree; "
                         "give runner='pooling' for an embedding model, or runner='generate'.")


def resolve_runner(args, hf_config) -> str:
    """``generate`` or ``pooling`` for this engine (EngineArgs ``runner`` / ``task`` / ``convert``)."""
    check_runner_args(args.runner, args.task, args.convert)
    for asked in (args.runner, _TASKS.get(args.task or "auto"), _convert_runner(args.convert)):
        if asked != "auto":
            break
    bare, classifier = is_bare_model(hf_config), is_classifier(hf_config)
    if asked == "generate" and (bare or classifier):
        archs = getattr(hf_config, "architectures", None)
        what = "a sequence classifier: it can classify and score" if classifier else \
            "a bare model without an LM head: it can embed"
        raise ValueError(f"Architecture {archs} is {what} but not generate; start it with "
                         "runner='pooling' (--runner pooling).")
    if asked == "auto":
        return "pooling" if bare or classifier else "generate"
    return asked


def _convert_runner(convert: str) -> str:
    """convert="embed" / "classify" (tessellm.pooling.convert) means runner="pooling"."""
    return "pooling" if convert in ("embed", "classify") else "auto"


def is_bare_model(hf_config) -> bool:
    """``LlamaModel``, ``Qwen3Model``, ``MistralModel``...: no ``*For*`` head in the name."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    return bool(archs) and all(a.endswith("Model") and "For" not in a for a in archs)


def is_classifier(hf_config) -> bool:
    """``LlamaForSequenceClassification``, ``Qwen3ForSequenceClassification``...: a score head."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    return any(a.endswith("ForSequenceClassification") for a in archs)


def classifier_labels(hf_config) -> tuple[str, ...]:
    """config.json's ``id2label`` in id order (HF fills in ``LABEL_i`` when it is absent)."""
    n = int(getattr(hf_config, "num_labels", 0) or 0)
    id2label = {int(k): str(v) for k, v in (getattr(hf_config, "id2label", None) or {}).items()}
    return tuple(id2label.get(i, f"LABEL_{i}") for i in range(n))


def use_sep_token(hf_config) -> bool:
    """vLLM's ``use_sep_token`` (``use_pad_token``, its older name) from config.json: true (the
    default, a cross-encoder's text pair) unless the checkpoint says it is an LLM reranker."""
    for key in ("use_pad_token", "use_sep_token"):
        value = getattr(hf_config, key, None)
        if value is not None:
            return bool(value)
    return True


def pooler_config_for(args, source) -> Optional[PoolerConfig]:
    """The engine's PoolerConfig in pooling mode, None when it generates."""
    if resolve_runner(args, source.hf_config) != "pooling":
        return None
    config = PoolerConfig(hidden_size=int(source.hf_config.hidden_size), **_model_defaults(source.hf_config))
    if is_classifier(source.hf_config):
        labels = classifier_labels(source.hf_config)
        config = replace(config, task="classify", num_labels=len(labels), labels=labels,
                         use_sep_token=use_sep_token(source.hf_config))
    if source.kind == "dir":
        config = replace(config, **sentence_transformers_pooling(source.path))
    for override in (args.pooler_config, args.override_pooler_config):
        given = parse_pooler_override(override)
        if "use_activation" in given and config.task != "classify":
            raise ValueError("pooler_config use_activation (softmax, activation) applies to a sequence "
                             "classifier (*ForSequenceClassification); this model embeds: use normalize.")
        config = replace(config, **given)
    return config


def _model_defaults(hf_config) -> dict:
    """What the model class says: an encoder (``bidirectional``) pools its first token unless
    told otherwise (its ``pooling_type(config)``: CLS, vLLM's default for BERT-family models;
    a ModernBERT classifier's ``classifier_pooling``)."""
    from tessellm.pooling.encoder import is_encoder

    if not is_encoder(hf_config):
        return {}
    from tessellm.models.registry import model_class

    return {"bidirectional": True, "pooling_type": model_class(hf_config, pooling=True).pooling_type(hf_config)}


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
        elif key == "normalize" or key in _ACTIVATION_KEYS:
            if not isinstance(v, bool):
                raise ValueError(f"pooler_config {key} must be true or false, got {v!r}.")
            name = "normalize" if key == "normalize" else "use_activation"
            if out.get(name, v) != v:
                raise ValueError(f"pooler_config gives {name} (or its older spelling) twice, as true and "
                                 "as false; give use_activation once.")
            out[name] = v
        else:
            raise ValueError(f"pooler_config key {key!r} is not supported; tessellm reads "
                             "pooling_type, normalize and use_activation (softmax, activation).")
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
