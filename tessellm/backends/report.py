"""``tessellm backends [--verbose]``: what is installed, what is available, who provides what."""

from __future__ import annotations

from typing import Optional

from tessellm.backends import spec
from tessellm.backends.registry import BackendRegistry, DeviceError, get_registry

# Quantization schemes probed for the verbose report.
_SCHEMES = ("fp8", "int8", "awq", "gptq", "gguf")


def describe_backends(verbose: bool = False, registry: Optional[BackendRegistry] = None) -> str:
    """Every discovered backend: its plugin, availability, priority, what it has been validated
    on and its capabilities; with ``verbose``, which plugin provides each piece for it."""
    registry = registry or get_registry()
    lines = [f"tessellm backend plugins (plugin API {spec.TESSELLM_PLUGIN_API}): "
             + ", ".join(_plugin_label(p) for p in registry.plugins.values())]
    rows = [("BACKEND", "PLUGIN", "AVAILABLE", "PRIORITY", "DEVICE", "DIST", "VALIDATED ON")]
    backends = sorted(registry.backends.values(), key=lambda b: (-b.priority, b.name))
    avail = {b.name for b in registry.available()}
    for b in backends:
        rows.append((b.name, b.plugin_name, "yes" if b.name in avail else "no", str(b.priority),
                     b.device_type, b.dist_backend, b.validated_on))
    lines += _table(rows)
    for name, reason in registry.broken.items():
        lines.append(f"DISABLED plugin {name}: {reason}")
    try:
        lines.append(f"--device=auto selects: {registry.select('auto').name}")
    except DeviceError as exc:
        lines.append(f"--device=auto: {exc}")
    for b in backends:
        lines.append("")
        lines.append(f"{b.name}: {b.description or '(no description)'}")
        if b.capabilities:
            caps = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(b.capabilities.items()))
            lines.append(f"  capabilities: {caps}")
        if b.validation_note:
            lines.append(f"  validation: {b.validation_note}")
        overriders = registry.overriders(b.name)
        if overriders:
            lines.append(f"  overridden by: {', '.join(overriders)} (TESSELLM_OVERRIDES)")
        if verbose:
            lines += _pieces(registry, b)
    if verbose:
        lines.append("")
        lines.append("hook implementations, in call order (tryfirst first):")
        for piece, hook in spec.PIECES.items():
            lines.append(f"  {piece} ({hook}): {', '.join(registry.implementers(hook)) or '-'}")
    return "\n".join(lines)


def _plugin_label(p) -> str:
    where = f" [{p.distribution} {p.version}]" if p.distribution else ""
    return f"{p.name} ({p.module}){where}"


def _pieces(registry: BackendRegistry, backend) -> list[str]:
    import torch

    dtype = torch.float32 if backend.device_type == "cpu" else torch.bfloat16
    attn = spec.AttentionSpec(num_heads=32, num_kv_heads=8, head_size=128, dtype=dtype,
                              block_size=16, max_model_len=4096, max_num_seqs=256)
    lines = ["  pieces (for a Llama-8B-shaped model, "
             f"{str(dtype).replace('torch.', '')}):"]
    probes = [("attention", attn), ("ops", spec.OpsSpec(dtype)),
              ("graph", spec.GraphSpec(max_num_seqs=256, dtype=dtype)),
              ("lora", spec.LoRAOpsSpec(dtype, max_loras=16, max_rank=64))]
    for piece, spec_obj in probes:
        lines.append(f"    {piece + ':':<10} {_probe(registry, piece, backend, spec_obj)}")
    quant = []
    for scheme in _SCHEMES:
        got = _probe(registry, "quant", backend, spec.QuantSpec(scheme, dtype=dtype))
        if not got.startswith("none"):
            quant.append(f"{scheme} -> {got}")
    lines.append(f"    {'quant:':<10} {'; '.join(quant) or 'none'}")
    return lines


def _probe(registry: BackendRegistry, piece: str, backend, spec_obj) -> str:
    try:
        result, plugin = registry.provider(piece, backend, spec_obj)
    except Exception as exc:  # noqa: BLE001 - the report shows the failure instead
        return f"error: {type(exc).__name__}: {exc}"
    if result is None:
        default = {"ops": "reference ops (no plugin answered)", "graph": "none (eager)",
                   "lora": "reference LoRA ops (no plugin answered)"}
        return default.get(piece, "none")
    name = getattr(result, "name", type(result).__name__)
    flags = _flags(piece, result)
    return (f"{name} ({type(result).__name__}) from plugin {plugin!r}"
            + (f" [{', '.join(flags)}]" if flags else ""))


def _flags(piece: str, result) -> list[str]:
    """The optional parts of the contract a piece declares (spec.AttentionKernel, FusedOps)."""
    if piece == "lora":
        return ["graph capture"] if getattr(result, "supports_graph_capture", False) else []
    if piece == "attention":
        declared = {"graph capture": "supports_graph_capture",
                    "sliding window": "supports_sliding_window", "fuses rotary": "fuses_rotary",
                    "logit soft-cap": "supports_logit_softcap",
                    "attention sinks": "supports_attention_sinks", "MLA": "supports_mla",
                    "key limits": "supports_key_limits"}
        return [label for label, attr in declared.items() if getattr(result, attr, False)]
    if piece == "ops":
        optional = {"linear": "linear", "linear + SiLU": "linear_silu_and_mul",
                    "all-reduce + norm": "all_reduce_add_rms_norm",
                    "fused MoE": "fused_moe", "fused experts": "fused_experts",
                    "fp8 act fold": "silu_and_mul_fp8", "KV block swap": "swap_blocks",
                    "gated RMSNorm": "gated_rms_norm"}
        flags = [label for label, attr in optional.items()
                 if callable(getattr(result, attr, None))]
        if callable(getattr(result, "fused_moe", None)):  # its declared variants after it
            variants = [label for label, attr in (("block-fp8 experts", "fused_moe_block_fp8"),
                                                  ("expert map", "fused_moe_expert_map"),
                                                  ("int4 experts", "fused_moe_int4"),
                                                  ("int4 act order",
                                                   "fused_moe_int4_act_order"),
                                                  ("bnb4 experts", "fused_moe_bnb4"))
                        if getattr(result, attr, False)]
            at = flags.index("fused MoE") + 1
            flags[at:at] = variants
        # speculative decoding's verify ops on recurrent layers, and whether graphs may hold them
        if any(callable(getattr(result, name, None)) for name in
               ("mamba_conv1d_verify", "mamba_state_update_verify", "gated_delta_verify")):
            flags.append("recurrent verify")
            if getattr(result, "recurrent_verify_graphs", False):
                flags.append("verify graphs")
        return flags
    return []


def _fmt(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
