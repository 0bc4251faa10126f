"""Which linears of the base model an adapter may touch, and their full (unsharded) shapes.

From the HF config alone, so the engine front end and core validate an adapter without the
model. Each logical module maps onto one of our (possibly fused) layers and its slice::

    q_proj k_proj v_proj  -> self_attn.qkv_proj  slices 0 1 2
    o_proj                -> self_attn.o_proj    slice 0      (row-parallel)
    gate_proj up_proj     -> mlp.gate_up_proj    slices 0 1
    down_proj             -> mlp.down_proj       slice 0      (row-parallel)

The PEFT module names an adapter may use depend on the family (its HF modules)::

    Llama, Mistral, Qwen2, Qwen3, Gemma 1-3 q/k/v/o_proj, gate/up/down_proj
    Phi-3                                   qkv_proj (fused: A shared, B's rows split q|k|v),
                                            o_proj, gate_up_proj (B split gate|up), down_proj
    Mixtral, Qwen2-MoE, Qwen3-MoE           q/k/v/o_proj (the expert MLPs are not supported)

A fused PEFT module becomes one logical module per part on load (``peft.py``), so the layers
only ever see the logical ones.
"""

from __future__ import annotations

from dataclasses import dataclass

# Logical module name -> (our layer under the decoder layer, slice index in it)
TARGETS = {
    "q_proj": ("self_attn.qkv_proj", 0), "k_proj": ("self_attn.qkv_proj", 1),
    "v_proj": ("self_attn.qkv_proj", 2), "o_proj": ("self_attn.o_proj", 0),
    "gate_proj": ("mlp.gate_up_proj", 0), "up_proj": ("mlp.gate_up_proj", 1),
    "down_proj": ("mlp.down_proj", 0),
}
# Our layer -> its logical modules in slice order.
LAYER_SLICES = {
    "self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "self_attn.o_proj": ("o_proj",),
    "mlp.gate_up_proj": ("gate_proj", "up_proj"), "mlp.down_proj": ("down_proj",),
}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
_SEPARATE = {m: (m,) for m in ATTENTION + MLP}
# PEFT module name -> the logical modules it covers (fused: B's rows in this order).
_PHI3 = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
         "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
_FAMILIES = {  # architecture -> (PEFT modules, what the refusal says about the rest)
    "Phi3ForCausalLM": (_PHI3, ""),
    **{arch: ({m: (m,) for m in ATTENTION},
              " (attention only: LoRA on the mixture-of-experts MLPs is not supported)")
       for arch in ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")},
}


@dataclass(frozen=True)
class BaseShapes:
    """Per logical module ``(in_features, out_features)`` of the whole (unsharded) base layer,
    and the PEFT modules this family's adapters may name."""

    num_layers: int
    shapes: dict  # logical module name -> (in, out)
    arch: str = "LlamaForCausalLM"
    peft_modules: dict = None  # PEFT module name -> logical modules (None: one each, all seven)
    note: str = ""  # appended to "supports ..." in refusals

    @property
    def modules(self) -> dict:
        return self.peft_modules if self.peft_modules is not None else _SEPARATE

    @property
    def layers(self) -> tuple:
        """Our layers that get LoRA slots (those some accepted module lands in)."""
        logical = {m for parts in self.modules.values() for m in parts}
        return tuple(layer for layer, parts in LAYER_SLICES.items() if logical & set(parts))

    def supported(self) -> str:
        return f"{', '.join(self.modules)}{self.note}"

    def peft_shape(self, module: str) -> tuple[int, int]:
        """(in, out) of a PEFT module: a fused one's out is the sum of its parts'."""
        parts = self.modules[module]
        return self.shapes[parts[0]][0], sum(self.shapes[p][1] for p in parts)

    @staticmethod
    def from_config(config) -> "BaseShapes":
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden = text.hidden_size
        heads = text.num_attention_heads
        kv = getattr(text, "num_key_value_heads", None) or heads
        head = getattr(text, "head_dim", None) or hidden // heads
        inter = text.intermediate_size
        q, kvs = heads * head, kv * head
        shapes = {"q_proj": (hidden, q), "k_proj": (hidden, kvs), "v_proj": (hidden, kvs),
                  "o_proj": (q, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
                  "down_proj": (inter, hidden)}
        archs = list(getattr(config, "architectures", None) or [])
        arch = next((a for a in archs if a in _FAMILIES), archs[0] if archs else "LlamaForCausalLM")
        modules, note = _FAMILIES.get(arch, (None, ""))
        return BaseShapes(text.num_hidden_layers, shapes, arch, modules, note)
