"""Which decoder layers use a sliding window, per family, as each family's HF modeling file
decides it. A layer's window is a number of keys (the query's own included) or None (full
attention); layers with different windows get different attention kernels
(``loader/model_loader.py``)."""

from __future__ import annotations

from typing import Optional


def window_everywhere(config) -> Optional[int]:
    """Mistral, Mixtral, Phi-3, Qwen3-MoE: ``sliding_window`` (when set and not switched off
    by ``use_sliding_window``) on every layer."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def window_by_layer_type(config, index: int) -> Optional[int]:
    """Qwen2, Qwen3, Qwen2-MoE: ``config.layer_types[index]`` says ``sliding_attention`` or
    ``full_attention`` (transformers 5 derives it from ``use_sliding_window`` and
    ``max_window_layers``); without it (transformers 4), layers from ``max_window_layers`` on
    slide, when ``use_sliding_window``."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        kind = types[index]
        if kind not in ("sliding_attention", "full_attention"):
            raise ValueError(f"config.layer_types[{index}] = {kind!r} is not supported; "
                             "supported: sliding_attention, full_attention.")
        return int(window) if kind == "sliding_attention" and window else None
    if not window or not getattr(config, "use_sliding_window", False):
        return None
    limit = getattr(config, "max_window_layers", None)
    if limit is None:
        return int(window)
    return int(window) if index >= limit else None
