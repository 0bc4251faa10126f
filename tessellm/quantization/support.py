"""Refusing what the selected backend cannot run, naming the backends that can.

Support is asked of the plugins themselves: a scheme is supported on backend B when some
plugin's ``tessellm_quant_method(B, spec)`` answers; an fp8 KV cache is supported when B's
attention kernel lists it in ``kv_cache_dtypes``. Both hooks are cheap and never touch a device,
so asking every registered backend is fine (a hook that raises counts as "no").
"""

from __future__ import annotations

import torch

from tessellm.backends.spec import KV_CACHE_DTYPES as _DECLARED

KV_CACHE_DTYPES = tuple(_DECLARED)  # declared, with their meaning, in backends/spec.py


class UnsupportedQuantizationError(ValueError):
    """A quantization scheme or KV cache dtype the selected backend does not support."""


def quant_method_or_refuse(registry, backend, spec):
    """The backend's method for ``spec``; UnsupportedQuantizationError when it has none."""
    method = registry.quant_method(backend, spec)
    if method is None:
        others = [b for b in _backends_where(registry, lambda b: registry.quant_method(b, spec))
                  if b != backend.name]
        raise UnsupportedQuantizationError(
            f"Quantization {spec.scheme!r} is not supported on backend {backend.name!r}; "
            + (f"backends that support it: {', '.join(others)}." if others
               else "no installed backend supports it."))
    return method


def check_kv_cache_dtype(registry, backend, kernel, attn_spec) -> None:
    """Refuse an unknown kv_cache_dtype, or one ``kernel`` does not declare."""
    wanted = attn_spec.kv_cache_dtype
    if wanted not in KV_CACHE_DTYPES:
        raise UnsupportedQuantizationError(f"kv_cache_dtype={wanted!r} is not known; use one of "
                                           f"{', '.join(KV_CACHE_DTYPES)}.")
    if wanted in kernel_kv_cache_dtypes(kernel):
        return

    def supports(b):
        other = kernel if b is backend else registry.attention_kernel(b, attn_spec)
        return other is not None and wanted in kernel_kv_cache_dtypes(other)

    others = [b for b in _backends_where(registry, supports) if b != backend.name]
    raise UnsupportedQuantizationError(
        f"kv_cache_dtype={wanted!r} is not supported by the {backend.name!r} attention kernel; "
        + (f"backends that support it: {', '.join(others)}." if others
           else "no installed backend supports it."))


def check_mla_kv_cache_dtype(registry, backend, attn_spec) -> None:
    """Refuse a quantized kv_cache_dtype for multi-head latent attention (``mla_value_size``:
    DeepSeek's latent KV cache) unless the backend's MLA kernel declares it. Asked before the
    kernel is built: a kernel that cannot store latent rows in that dtype may fail in its own
    words (or another plugin answer for the spec), which would read as "no MLA kernel"."""
    wanted = attn_spec.kv_cache_dtype
    if attn_spec.mla_value_size is None or wanted == "auto" or wanted not in KV_CACHE_DTYPES:
        return

    def serves(b):
        kernel = registry.attention_kernel(b, attn_spec)
        return (kernel is not None and getattr(kernel, "supports_mla", False)
                and wanted in kernel_kv_cache_dtypes(kernel))

    names = _backends_where(registry, serves)
    if backend.name in names:
        return
    raise UnsupportedQuantizationError(
        f"kv_cache_dtype={wanted!r} is not supported with multi-head latent attention (this "
        f"model caches one latent row a token, AttentionSpec.mla_value_size="
        f"{attn_spec.mla_value_size}) on backend {backend.name!r}: its MLA attention kernel "
        "keeps the latent cache in the model's dtype; use kv_cache_dtype='auto'"
        + (f", or a backend that supports it: {', '.join(names)}." if names else "."))


def kernel_kv_cache_dtypes(kernel) -> tuple[str, ...]:
    return tuple(getattr(kernel, "kv_cache_dtypes", ("auto",)))


def kv_cache_torch_dtype(kernel, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the KV cache is allocated in: the kernel's choice for its spec, else the model's."""
    return getattr(kernel, "kv_cache_torch_dtype", None) or model_dtype


def _backends_where(registry, predicate) -> list[str]:
    names = []
    for name, backend in sorted(registry.backends.items()):
        try:
            ok = bool(predicate(backend))
        except Exception:  # noqa: BLE001 - a plugin that cannot answer does not support it
            ok = False
        if ok:
            names.append(name)
    return names
