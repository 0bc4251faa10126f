"""Build a model on the selected backend's device and fill its weights."""

from __future__ import annotations

import functools

import torch

from tessellm.backends.reference.ops import ReferenceOps
from tessellm.backends.spec import AttentionSpec, OpsSpec
from tessellm.config import ModelSource
from tessellm.layers.context import ModelContext
from tessellm.models.registry import model_class


def build_model(source: ModelSource, load_format: str, registry, backend, dtype: torch.dtype,
                device: torch.device, block_size: int, kv_cache_dtype: str = "auto", seed: int = 0):
    """Returns ``(model, attention_kernel)``; the kernel is shared by every layer."""
    config = source.hf_config
    cls = model_class(config)  # raises for unsupported architectures before any allocation
    ops = registry.fused_ops(backend, OpsSpec(dtype)) or ReferenceOps()
    heads = config.num_attention_heads
    kernels = {}

    def make_kernel(window):
        if window not in kernels:
            spec = AttentionSpec(
                num_heads=heads, num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                head_size=getattr(config, "head_dim", None) or config.hidden_size // heads,
                dtype=dtype, block_size=block_size, kv_cache_dtype=kv_cache_dtype,
                sliding_window=window)
            kernel = registry.attention_kernel(backend, spec)
            if kernel is None:
                raise RuntimeError(f"No plugin provides an attention kernel for backend "
                                   f"{backend.name!r} with {spec}.")
            kernels[window] = kernel
        return kernels[window]

    ctx = ModelContext(ops=ops, make_attention_kernel=make_kernel, dtype=dtype, device=device)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config, ctx)
    finally:
        torch.set_default_dtype(previous)
    _load_weights(model, source, load_format, dtype, seed)
    model.eval()
    if len(kernels) != 1:
        raise RuntimeError(f"Expected one attention kernel per model, got {len(kernels)}.")
    return model, next(iter(kernels.values()))


def _load_weights(model, source: ModelSource, load_format: str, dtype: torch.dtype, seed: int) -> None:
    if load_format == "dummy":
        from tessellm.loader.dummy import init_dummy_weights

        init_dummy_weights(model, seed)
        return
    if source.kind == "gguf":
        from tessellm.loader.gguf_loader import iter_gguf_weights

        weights = iter_gguf_weights(source.path, dtype)
    else:
        from tessellm.loader.safetensors_loader import iter_safetensors_weights

        weights = iter_safetensors_weights(source.path, dtype)
    loaded = model.load_weights(weights)
    expected = {n for n, _ in model.named_parameters()}
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"The checkpoint at {source.path} lacks {len(missing)} weights, e.g. "
                         f"{missing[:3]}; is it complete and the right architecture?")


@functools.lru_cache(maxsize=8)
def load_tokenizer(source_path: str, kind: str, tokenizer_dir: str | None = None):
    """The HF tokenizer for a model, or None when the directory has no tokenizer files."""
    if kind == "gguf" and tokenizer_dir is None:
        from tessellm.loader.gguf_loader import load_gguf_tokenizer

        return load_gguf_tokenizer(source_path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir or source_path)
