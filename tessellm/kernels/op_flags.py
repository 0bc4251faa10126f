"""Optional capability flags tied to the ops they describe, and the one rule that keeps a
subclass from inheriting a flag its own op does not honour.

An optional flag on an ops object (``backends/spec.py``: ``FusedOps``, ``LoRAOps``) declares a
variant of one or more of its ops: keywords the engine then passes (``fused_moe_int4``:
``int4``, ``w13_zeros``; ``mamba_state_saves``, ``mamba_conv_state_saves``: ``snapshots``), inputs it no longer copies
(``mamba_strided_inputs``) or calls it makes inside a captured graph
(``recurrent_verify_graphs``). A plugin's ops often subclass an in-tree base (``ReferenceOps``,
``TritonOps``, ``TritonLoRAOps``) and replace one op; the base's flag speaks for the base's op,
not for the replacement. So: a subclass that defines one of a flag's ops in its own class body
and does not set the flag there gets the flag's "off" value (``drop_unowned_flags``, called by
each base's ``__init_subclass__``); one that replaces no op of a flag keeps what it inherits.

Here (not in ``backends/``) because ``tessellm.kernels`` may not import ``tessellm.backends``
(``tests/backends/test_import_rules.py``), and both the reference and the Triton bases use it.
"""

from __future__ import annotations

from typing import Any, Mapping

# the layer hands both the same variant keywords (``layers/moe.py``)
MOE_OPS = ("fused_moe", "fused_experts")
# the Mamba ops that take a layer's token rows (``mamba_strided_inputs``)
MAMBA_TOKEN_OPS = ("mamba_conv1d", "mamba_chunk_scan", "mamba_state_update",
                   "mamba_conv1d_verify", "mamba_state_update_verify")
# the optional verify ops of speculative decoding on recurrent models
VERIFY_OPS = ("mamba_conv1d_verify", "mamba_state_update_verify", "gated_delta_verify")

# An op family's declaration (all its ops together, ``backends/spec.py``): a subclass replacing
# one op of the family still serves the family, so these are inherited as they are.
FAMILY_FLAGS = ("supports_mamba2", "supports_gated_delta")

# ``FusedOps``' optional flags: flag -> (the ops it describes, its value when not declared)
FUSED_OPS_FLAGS: Mapping[str, tuple[tuple[str, ...], Any]] = {
    "fused_moe_activations": (MOE_OPS, ("silu",)),  # kinds (and expert biases) beyond SiLU
    "fused_moe_block_fp8": (MOE_OPS, False),  # keyword block_shape
    "fused_moe_expert_map": (MOE_OPS, False),  # keyword expert_map
    "fused_moe_int4": (MOE_OPS, False),  # keywords int4, w13_zeros, w2_zeros (API 15)
    "fused_moe_int4_act_order": (MOE_OPS, False),  # keyword w13_perm (API 20)
    "fused_moe_bnb4": (MOE_OPS, False),  # keyword bnb4_code: bitsandbytes 4-bit experts (API 26)
    "mamba_strided_inputs": (MAMBA_TOKEN_OPS, False),  # row-strided x and dt (API 17)
    "mamba_state_saves": (("mamba_chunk_scan",), False),  # keyword snapshots (API 21)
    "gated_delta_state_saves": (("gated_delta_chunk",), False),  # keyword snapshots (API 22)
    "mamba_conv_state_saves": (("mamba_conv1d",), False),  # keyword snapshots (API 23)
    "recurrent_verify_graphs": (VERIFY_OPS, False),  # own verify ops in a captured step (API 16)
}

# ``LoRAOps``' optional flags
LORA_OPS_FLAGS: Mapping[str, tuple[tuple[str, ...], Any]] = {
    # every op a captured step calls reads nothing on the host
    "supports_graph_capture": (("prepare", "shrink", "expand", "expand_slices",
                                "fused_experts_lora"), False),
}

# ``QuantOps`` has no optional flag (``schemes`` is required and each class lists its own; the
# optional fp8 hooks are methods, inherited with the ``fp8_mm`` they stand beside).
QUANT_OPS_FLAGS: Mapping[str, tuple[tuple[str, ...], Any]] = {}


def drop_unowned_flags(cls: type, table: Mapping[str, tuple[tuple[str, ...], Any]]) -> None:
    """For each ``flag: (ops, off)`` of ``table``: where ``cls`` defines one of ``ops`` in its
    own body and not ``flag``, set ``cls.flag = off``. Call from ``__init_subclass__``."""
    own = cls.__dict__
    for flag, (ops, off) in table.items():
        if flag not in own and any(op in own for op in ops):
            setattr(cls, flag, off)
