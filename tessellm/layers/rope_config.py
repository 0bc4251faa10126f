"""Reads a model's rotary settings from its HF config, in either form transformers has used:

- transformers 5: ``config.rope_parameters``, a flat dict (``rope_type``, ``rope_theta``,
  ``factor``, ...) or one dict per layer type (Gemma 3: ``{"sliding_attention": {...},
  "full_attention": {...}}``);
- transformers 4: ``config.rope_theta`` and ``config.rope_scaling`` (``type`` or
  ``rope_type`` plus the type's keys), ``config.partial_rotary_factor`` beside them.

The result is one flat dict with ``rope_type``, ``rope_theta``, ``partial_rotary_factor`` and,
for the types that need them, ``original_max_position_embeddings`` and
``max_position_embeddings`` (what HF's own rope functions read from the config).
"""

from __future__ import annotations

from typing import Optional

from tessellm.layers.rotary import check_rope_type, rope_type


def _nested(params: dict) -> bool:
    return any(isinstance(v, dict) for v in params.values())


def rope_parameters(config, layer_type: Optional[str] = None,
                    default_theta: float = 10000.0) -> dict:
    params = dict(getattr(config, "rope_parameters", None) or {})
    if _nested(params):
        if layer_type is None or not isinstance(params.get(layer_type), dict):
            raise ValueError(f"The config's rope_parameters are per layer type "
                             f"({', '.join(params)}) but this model reads one set.")
        params = dict(params[layer_type])
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict) and scaling and not _nested(scaling):
        params = {**params, **scaling}  # transformers 4 (in 5 an alias of rope_parameters)
    return complete_rope_parameters(params, config, default_theta)


def complete_rope_parameters(params: dict, config, default_theta: float = 10000.0) -> dict:
    """Fills in what ``params`` (one layer type's settings) leaves to the config or defaults."""
    params = dict(params)
    if params.get("rope_theta") is None:
        params["rope_theta"] = getattr(config, "rope_theta", None) or default_theta
    params["rope_theta"] = float(params["rope_theta"])
    params["rope_type"] = rope_type(params)
    params.pop("type", None)
    if params.get("partial_rotary_factor") is None:
        params["partial_rotary_factor"] = getattr(config, "partial_rotary_factor", None) or 1.0
    if params["rope_type"] in ("llama3", "yarn", "longrope", "su"):
        # As transformers: a config-level original_max_position_embeddings (Phi-3 keeps it
        # there) wins, then the rope dict's, then max_position_embeddings.
        original = (getattr(config, "original_max_position_embeddings", None)
                    or params.get("original_max_position_embeddings")
                    or config.max_position_embeddings)
        params["original_max_position_embeddings"] = int(original)
        params["max_position_embeddings"] = int(config.max_position_embeddings)
    check_rope_type(params)
    return params


def rope_max_positions(config) -> int:
    """How many positions the model's rotary serves: ``max_position_embeddings``, or, for yarn,
    the extended length ``original_max_position_embeddings * factor`` when that is larger
    (Qwen2.5 ships max_position_embeddings 32768 and adds yarn factor 4 for 131072; HF rotates
    any position, vLLM serves that far). Dynamic NTK is not extended: past
    max_position_embeddings HF rescales every position per forward pass, which a KV cache of
    rotated keys cannot follow."""
    limit = int(config.max_position_embeddings)
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict) and not _nested(scaling):
        params.update(scaling)
    for p in [v for v in params.values() if isinstance(v, dict)] or [params]:
        if rope_type(p) == "yarn" and p.get("factor"):
            original = (getattr(config, "original_max_position_embeddings", None)
                        or p.get("original_max_position_embeddings") or limit)
            limit = max(limit, int(original * p["factor"]))
    return limit
