"""Which linears of the base model an adapter may touch, and their full (unsharded) shapes.

From the HF config alone, so the engine front end and core validate an adapter without the
model. Each PEFT module maps onto one of our (possibly fused) layers and its slice::

    q_proj k_proj v_proj  -> self_attn.qkv_proj  slices 0 1 2
    o_proj                -> self_attn.o_proj    slice 0      (row-parallel)
    gate_proj up_proj     -> mlp.gate_up_proj    slices 0 1
    down_proj             -> mlp.down_proj       slice 0      (row-parallel)
"""

from __future__ import annotations

from dataclasses import dataclass

# PEFT module name -> (our layer under the decoder layer, slice index in it)
TARGETS = {
    "q_proj": ("self_attn.qkv_proj", 0), "k_proj": ("self_attn.qkv_proj", 1),
    "v_proj": ("self_attn.qkv_proj", 2), "o_proj": ("self_attn.o_proj", 0),
    "gate_proj": ("mlp.gate_up_proj", 0), "up_proj": ("mlp.gate_up_proj", 1),
    "down_proj": ("mlp.down_proj", 0),
}
# Our layer -> its PEFT modules in slice order.
LAYER_SLICES = {
    "self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "self_attn.o_proj": ("o_proj",),
    "mlp.gate_up_proj": ("gate_proj", "up_proj"), "mlp.down_proj": ("down_proj",),
}


@dataclass(frozen=True)
class BaseShapes:
    """Per PEFT module ``(in_features, out_features)`` of the whole (unsharded) base layer."""

    num_layers: int
    shapes: dict  # module name -> (in, out)

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
        return BaseShapes(text.num_hidden_layers, shapes)
