"""Which linears of the base model an adapter may touch, and their full (unsharded) shapes.

From the HF config alone, so the engine front end and core validate an adapter without the
model. Each logical module maps onto one of our (possibly fused) layers and its slice::

    q_proj k_proj v_proj  -> self_attn.qkv_proj  slices 0 1 2
    o_proj                -> self_attn.o_proj    slice 0      (row-parallel)
    gate_proj up_proj     -> mlp.gate_up_proj    slices 0 1
    down_proj             -> mlp.down_proj       slice 0      (row-parallel)
    fc_in                 -> mlp.fc_in           slice 0      (an MLP without a gate:
    fc_out                -> mlp.fc_out          slice 0       ``dense_mlp.py``; row-parallel)
    mamba_z .. mamba_dt   -> mamba.in_proj       slices 0-4   (a hybrid's Mamba2 mixer)
    mamba_out             -> mamba.out_proj      slice 0      (row-parallel)
    mixer_q .. mixer_dt   -> mixer.{qkv_proj, o_proj, fc_in, fc_out, in_proj}
                             (Nemotron-H: one mixer a layer)
    dn_q dn_k dn_v dn_z   -> linear_attn.in_proj_qkvz  slices 0-3 (Qwen3-Next's gated DeltaNet)
    dn_b dn_a, dn_out     -> linear_attn.in_proj_ba 0-1, linear_attn.out_proj 0 (row-parallel)

The HF modules an adapter may name, and the logical modules each covers, are the family's
(``families.py``); a fused HF module (Phi-3's ``qkv_proj``, GPT-NeoX's per-head
``query_key_value``) becomes one logical module per part on load (``peft.py``), so the layers
only ever see the logical ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from tessellm.lora.families import Family, family_of, supported_architectures

# Our layer under the decoder layer -> its logical modules in slice order.
LAYER_SLICES = {
    "self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "self_attn.o_proj": ("o_proj",),
    "mlp.gate_up_proj": ("gate_proj", "up_proj"), "mlp.down_proj": ("down_proj",),
    "mlp.fc_in": ("fc_in",), "mlp.fc_out": ("fc_out",),
    "mamba.in_proj": ("mamba_z", "mamba_x", "mamba_B", "mamba_C", "mamba_dt"),
    "mamba.out_proj": ("mamba_out",),
    "mlp.shared_expert.gate_up_proj": ("shared_gate_proj", "shared_up_proj"),
    "mlp.shared_expert.down_proj": ("shared_down_proj",),
    "mixer.qkv_proj": ("mixer_q", "mixer_k", "mixer_v"), "mixer.o_proj": ("mixer_o",),
    "mixer.fc_in": ("mixer_up",), "mixer.fc_out": ("mixer_down",),
    "mixer.in_proj": ("mixer_z", "mixer_x", "mixer_B", "mixer_C", "mixer_dt"),
    "linear_attn.in_proj_qkvz": ("dn_q", "dn_k", "dn_v", "dn_z"),
    "linear_attn.in_proj_ba": ("dn_b", "dn_a"), "linear_attn.out_proj": ("dn_out",),
    # DeepSeek's multi-head latent attention (q_proj without q_lora, else q_a + q_b)
    "self_attn.q_proj": ("mla_q",), "self_attn.q_a_proj": ("mla_q_a",),
    "self_attn.q_b_proj": ("mla_q_b",), "self_attn.kv_a_proj_with_mqa": ("mla_kv_a",),
    # DeepSeek's (a model has one of the two shared MLPs)
    "mlp.shared_experts.gate_up_proj": ("shared_gate_proj", "shared_up_proj"),
    "mlp.shared_experts.down_proj": ("shared_down_proj",),
}
# Logical module name -> (our layer, slice index in it)
TARGETS = {part: (layer, i)
           for layer, parts in LAYER_SLICES.items() for i, part in enumerate(parts)}


@dataclass(frozen=True)
class BaseShapes:
    """Per logical module ``(in_features, out_features)`` of the whole (unsharded) base layer,
    and the HF modules this family's adapters may name."""

    num_layers: int
    shapes: dict  # logical module name -> (in, out)
    arch: str
    family: Family
    config: object = field(compare=False, repr=False)  # the text config (fused splits read it)
    num_experts: int = 0  # routed experts of each MoE layer, when the family's experts take LoRA
    expert_shapes: dict = field(default_factory=dict)  # "gate" | "up" | "down" -> (in, out)
    # an image-text model served with images: adapters name its language model's modules
    # (``model.language_model.layers...``), and the vision tower takes no LoRA
    image_text: bool = False

    @property
    def modules(self) -> dict:
        """HF module path under a decoder layer -> the logical modules it covers."""
        return self.family.modules

    @property
    def layer_prefix(self) -> str:
        """The HF path of the decoder layer list (``model.layers``)."""
        return self.family.layers

    @property
    def layers(self) -> tuple:
        """Our layers that get LoRA slots (those some accepted module lands in)."""
        logical = {m for parts in self.modules.values() for m in parts}
        return tuple(layer for layer, parts in LAYER_SLICES.items() if logical & set(parts))

    def supported(self) -> str:
        """The modules an adapter may name, as PEFT's ``target_modules`` spells them."""
        names = dict.fromkeys(path.rpartition(".")[2] for path in self.modules)
        return f"{', '.join(names)}{self.family.note}"

    def peft_shape(self, module: str) -> tuple[int, int]:
        """(in, out) of an HF module: a fused one's out is the sum of its parts'."""
        parts = self.modules[module]
        return self.shapes[parts[0]][0], sum(self.shapes[p][1] for p in parts)

    def split(self, module: str, b) -> tuple:
        """B ``[out, r]`` of an HF module -> one B per logical part (``families.py``)."""
        parts = self.modules[module]
        if len(parts) == 1:
            return (b,)
        return self.family.split(self.config, module, b, [self.shapes[p][1] for p in parts])

    @staticmethod
    def from_config(config, quantization: Optional[str] = None) -> "BaseShapes":
        """Refuses an architecture without a LoRA layout, naming those with one. A quantized
        model (``quantization``, or the checkpoint's ``quantization_config``) takes no expert
        LoRA: its fp8 experts have no slots, so such adapters are refused when read."""
        arch, family = family_of(list(getattr(config, "architectures", None) or []))
        image_text = family is None and _takes_images(config)
        if image_text:  # LoRA on the language model, as its text family's (vLLM's too)
            from tessellm.multimodal.text_only import text_family

            family = family_of([text_family(config)])[1]
        if family is None:
            raise ValueError(f"LoRA is not supported for {arch} yet; it is for "
                             f"{supported_architectures()} (and their classifier and embedding "
                             "heads); serve the model without --enable-lora, or merge the "
                             "adapter into its weights.")
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden = text.hidden_size
        heads = text.num_attention_heads
        kv = getattr(text, "num_key_value_heads", None) or heads
        head = getattr(text, "head_dim", None) or hidden // heads
        inter = family.intermediate(text)
        q, kvs = heads * head, kv * head
        shapes = {"q_proj": (hidden, q), "k_proj": (hidden, kvs), "v_proj": (hidden, kvs),
                  "o_proj": (q, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
                  "down_proj": (inter, hidden), "fc_in": (hidden, inter),
                  "fc_out": (inter, hidden)}
        if getattr(text, "mamba_n_heads", None):  # a hybrid's Mamba2 mixers (Bamba, Granite 4.0-H)
            inner = text.mamba_n_heads * text.mamba_d_head
            gn = text.mamba_n_groups * text.mamba_d_state
            shapes.update({"mamba_z": (hidden, inner), "mamba_x": (hidden, inner),
                           "mamba_B": (hidden, gn), "mamba_C": (hidden, gn),
                           "mamba_dt": (hidden, text.mamba_n_heads), "mamba_out": (inner, hidden)})
        shared = (getattr(text, "shared_expert_intermediate_size", 0)  # Qwen2-MoE's, or DeepSeek's
                  or (getattr(text, "n_shared_experts", 0) or 0) * getattr(
                      text, "moe_intermediate_size", 0))
        shapes.update({"shared_gate_proj": (hidden, shared), "shared_up_proj": (hidden, shared),
                       "shared_down_proj": (shared, hidden)})
        if getattr(text, "mamba_num_heads", None):  # Nemotron-H: one mixer a layer
            inner = text.mamba_num_heads * text.mamba_head_dim
            gn = text.n_groups * text.ssm_state_size
            shapes.update({"mixer_q": shapes["q_proj"], "mixer_k": shapes["k_proj"],
                           "mixer_v": shapes["v_proj"], "mixer_o": shapes["o_proj"],
                           "mixer_up": shapes["fc_in"], "mixer_down": shapes["fc_out"],
                           "mixer_z": (hidden, inner), "mixer_x": (hidden, inner),
                           "mixer_B": (hidden, gn), "mixer_C": (hidden, gn),
                           "mixer_dt": (hidden, text.mamba_num_heads)})
        if getattr(text, "linear_num_key_heads", None):  # Qwen3-Next: gated DeltaNet layers
            keys = text.linear_num_key_heads * text.linear_key_head_dim
            values = text.linear_num_value_heads * text.linear_value_head_dim
            vh = text.linear_num_value_heads
            shapes.update({"q_proj": (hidden, 2 * q),  # each head's query and output gate
                           "dn_q": (hidden, keys), "dn_k": (hidden, keys),
                           "dn_v": (hidden, values), "dn_z": (hidden, values),
                           "dn_b": (hidden, vh), "dn_a": (hidden, vh), "dn_out": (values, hidden)})
        if getattr(text, "kv_lora_rank", None):  # DeepSeek's MLA
            qk = text.qk_nope_head_dim + text.qk_rope_head_dim
            q_rank = getattr(text, "q_lora_rank", None) or 0
            shapes.update({"mla_q": (hidden, heads * qk), "mla_q_a": (hidden, q_rank),
                           "mla_q_b": (q_rank, heads * qk),
                           "mla_kv_a": (hidden, text.kv_lora_rank + text.qk_rope_head_dim),
                           "o_proj": (heads * text.v_head_dim, hidden)})
        experts, expert_shapes = 0, {}
        quantized = quantization or getattr(config, "quantization_config", None) or getattr(
            text, "quantization_config", None)
        if family.experts is not None and quantized:
            family = replace(family, experts=None, note=" (attention only: the experts of a "
                             "quantized model take no LoRA; serve it unquantized for expert LoRA)")
        if family.experts is not None:
            experts, width = family.num_experts(text), family.expert_size(text)
            expert_shapes = {"gate": (hidden, width), "up": (hidden, width), "down": (width, hidden)}
        return BaseShapes(text.num_hidden_layers, shapes, arch, family, text, experts,
                          expert_shapes, image_text)


def _takes_images(config) -> bool:
    from tessellm.multimodal.limits import takes_images

    return takes_images(config)
