"""Each family's HF modules a PEFT LoRA adapter may adapt, and the logical modules they land in.

An adapter names HF modules (``gpt_neox.layers.3.attention.query_key_value``); our layers are
fused (``shapes.py``). Per family: where the decoder layers live, and each adaptable module's
path under a layer -> its logical parts (B's rows, in that order)::

    layout      HF module under the layer                  logical parts
    llama       self_attn.{q,k,v,o}_proj                   q_proj, k_proj, v_proj, o_proj
                mlp.{gate,up,down}_proj                    gate_proj, up_proj, down_proj
    phi3        self_attn.qkv_proj  [q | k | v]            q_proj k_proj v_proj
                mlp.gate_up_proj    [gate | up]            gate_proj up_proj
    glm         llama's attention, phi3's gate_up_proj
    phi         self_attn.{q,k,v}_proj, self_attn.dense    ..., o_proj
                mlp.fc1, mlp.fc2                           fc_in, fc_out
    starcoder2  llama's attention, mlp.c_fc, mlp.c_proj    ..., fc_in, fc_out
    apertus     llama's attention, mlp.up_proj, down_proj  ..., fc_in, fc_out  (no gate: xIELU)
    gptj        attn.{q,k,v,out}_proj, mlp.fc_in/fc_out    ..., o_proj, fc_in, fc_out
    gpt_neox    attention.query_key_value (per head)       q_proj k_proj v_proj
                attention.dense, mlp.dense_h_to_4h/4h_to_h o_proj, fc_in, fc_out
    falcon      self_attention.query_key_value (3 layouts) q_proj k_proj v_proj
                self_attention.dense, mlp.dense_h_to_4h/.. o_proj, fc_in, fc_out
    gpt_bigcode attn.c_attn (MQA [q|k|v], else per head)   q_proj k_proj v_proj
                attn.c_proj, mlp.c_fc, mlp.c_proj          o_proj, fc_in, fc_out
    MoE         llama's attention only (experts: no LoRA)
    DeepSeek    self_attn.{q,q_a,q_b,kv_a_proj_with_mqa,o}_proj (not kv_b_proj); the MLPs:
                mlp.{gate,up,down}_proj (dense layers), mlp.shared_experts.*, experts
    Qwen2-MoE   as Qwen3-MoE, plus mlp.shared_expert.{gate,up,down}_proj and the dense layers'
                mlp.{gate,up,down}_proj (each where the layer has it)
    Mixtral, Qwen3-MoE, OLMoE   llama's attention and every expert's gate/up/down (``experts.py``:
                per-expert modules ``block_sparse_moe.experts.<e>.w1|w3|w2`` or
                ``mlp.experts.<e>.gate_proj|up_proj|down_proj``, or the fused ``mlp.experts``
                parameters ``gate_up_proj`` / ``down_proj`` of transformers 5)
    Bamba       llama's attention and MLP (``feed_forward`` -> ``mlp``), on its attention /
                every layer; mamba.in_proj [z|x|B|C|dt] mamba_z mamba_x mamba_B mamba_C mamba_dt
                mamba.out_proj                             mamba_out   (on its Mamba layers)
    Qwen3-Next  llama's attention names (q_proj: query and gate per head); linear_attn
                .in_proj_qkvz (per key head [q k v z]) dn_q dn_k dn_v dn_z, .in_proj_ba
                dn_b dn_a, .out_proj dn_out (experts: no LoRA)
    Nemotron-H  (backbone|model).layers.{i}.mixer.{q,k,v,o}_proj mixer_q .. mixer_o, .{up,down}_proj
                mixer_up mixer_down, .in_proj mixer_z .. mixer_dt (each layer has one kind
                of mixer; MoE layers and the Mamba out_proj: no LoRA)
    Granite 4.0-H  llama's attention and Bamba's Mamba projections (experts and the shared MLP:
                no LoRA)

A fused module's B is cut into its parts by the same function that cuts the family's
checkpoint weight on load (``split``; rows of ``lora_B [out, r]`` are rows of the weight's
``[out, in]``), so each part lines up with our fused layer's slice as the base weight does,
interleaved per-head and per-group layouts included; A is shared by the parts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional

from tessellm.lora.experts import ExpertNames

Q, K, V = ("q_proj",), ("k_proj",), ("v_proj",)
QKV = ("q_proj", "k_proj", "v_proj")
O = ("o_proj",)
FC_IN, FC_OUT = ("fc_in",), ("fc_out",)

_LLAMA_ATTN = {"self_attn.q_proj": Q, "self_attn.k_proj": K, "self_attn.v_proj": V,
               "self_attn.o_proj": O}
_LLAMA_MLP = {"mlp.gate_proj": ("gate_proj",), "mlp.up_proj": ("up_proj",),
              "mlp.down_proj": ("down_proj",)}
_FUSED_GATE_UP = {"mlp.gate_up_proj": ("gate_proj", "up_proj"), "mlp.down_proj": ("down_proj",)}


def _neox_split(config, tensor):
    from tessellm.models.gpt_neox import split_query_key_value

    return split_query_key_value(config, tensor)


def _falcon_split(config, tensor):
    from tessellm.models.falcon import split_query_key_value

    return split_query_key_value(config, tensor)


def _exaone_names(name: str) -> str:
    from tessellm.models.exaone import llama_name

    return llama_name(name)


def _bigcode_split(config, tensor):
    from tessellm.models.gpt_bigcode import split_c_attn

    return split_c_attn(config, tensor)


@dataclass(frozen=True)
class Family:
    """One layout of the table above."""

    layers: str  # the HF path of the decoder layer list ("model.layers", "transformer.h")
    modules: dict  # HF module path under a layer -> logical parts (B's rows in that order)
    # fused module path -> split(config, B) into its parts' rows, when they are not consecutive
    # runs in the parts' order (a per-head or per-group layout); else split by the parts' sizes
    splits: dict = field(default_factory=dict)
    note: str = ""  # what the refusal of another module adds ("attention only: ...")
    intermediate: Callable = lambda c: c.intermediate_size  # the MLP's width
    # another naming of the same modules -> ours (``transformer.h.3.attn.attention.q_proj`` ->
    # ``model.layers.3.self_attn.q_proj``), as the family's loader renames its checkpoints
    rename: Optional[Callable[[str], str]] = None
    # the experts' LoRA naming (None: the experts take no LoRA), their count and width
    experts: Optional[ExpertNames] = None
    num_experts: Callable = lambda c: c.num_experts
    expert_size: Callable = lambda c: c.moe_intermediate_size
    # some of its linears are absent from some layers (MoE and dense layers mixed, DeepSeek's
    # q_proj or q_a/q_b): each is wrapped where a layer has it
    optional: bool = False

    def split(self, config, path: str, b, sizes: list[int]) -> tuple:
        """B ``[sum(sizes), r]`` of the fused module at ``path`` -> one B per logical part."""
        how = self.splits.get(path)
        return tuple(how(config, b)) if how is not None else tuple(b.split(sizes, dim=0))


def _gpt_width(config) -> int:  # GPT-J, GPT-BigCode: n_inner, else 4x hidden
    return getattr(config, "n_inner", None) or 4 * config.hidden_size


LLAMA = Family("model.layers", {**_LLAMA_ATTN, **_LLAMA_MLP})
PHI3 = Family("model.layers", {"self_attn.qkv_proj": QKV, "self_attn.o_proj": O,
                               **_FUSED_GATE_UP})
GLM = Family("model.layers", {**_LLAMA_ATTN, **_FUSED_GATE_UP})
PHI = Family("model.layers", {"self_attn.q_proj": Q, "self_attn.k_proj": K,
                              "self_attn.v_proj": V, "self_attn.dense": O,
                              "mlp.fc1": FC_IN, "mlp.fc2": FC_OUT})
STARCODER2 = Family("model.layers", {**_LLAMA_ATTN, "mlp.c_fc": FC_IN, "mlp.c_proj": FC_OUT})
APERTUS = Family("model.layers", {**_LLAMA_ATTN, "mlp.up_proj": FC_IN, "mlp.down_proj": FC_OUT})
GPTJ = Family("transformer.h", {"attn.q_proj": Q, "attn.k_proj": K, "attn.v_proj": V,
                                "attn.out_proj": O, "mlp.fc_in": FC_IN, "mlp.fc_out": FC_OUT},
              intermediate=_gpt_width)
GPT_NEOX = Family("gpt_neox.layers",
                  {"attention.query_key_value": QKV, "attention.dense": O,
                   "mlp.dense_h_to_4h": FC_IN, "mlp.dense_4h_to_h": FC_OUT},
                  splits={"attention.query_key_value": _neox_split})
FALCON = Family("transformer.h",
                {"self_attention.query_key_value": QKV, "self_attention.dense": O,
                 "mlp.dense_h_to_4h": FC_IN, "mlp.dense_4h_to_h": FC_OUT},
                splits={"self_attention.query_key_value": _falcon_split},
                intermediate=lambda c: c.ffn_hidden_size)
GPT_BIGCODE = Family("transformer.h",
                     {"attn.c_attn": QKV, "attn.c_proj": O, "mlp.c_fc": FC_IN,
                      "mlp.c_proj": FC_OUT},
                     splits={"attn.c_attn": _bigcode_split}, intermediate=_gpt_width)
MOE_ATTENTION = Family("model.layers", dict(_LLAMA_ATTN),
                       note=" (attention only: LoRA on the mixture-of-experts MLPs is not "
                            "supported)")
_EXPERTS_NOTE = " (and the experts' gate/up/down projections: w1, w3, w2 for Mixtral)"
MIXTRAL = Family("model.layers", dict(_LLAMA_ATTN), note=_EXPERTS_NOTE,
                 experts=ExpertNames(("block_sparse_moe.experts", "mlp.experts"),
                                     {"w1": "gate", "w3": "up", "w2": "down"}),
                 num_experts=lambda c: c.num_local_experts,
                 expert_size=lambda c: c.intermediate_size)
QWEN_MOE = Family("model.layers", dict(_LLAMA_ATTN), note=_EXPERTS_NOTE,
                  experts=ExpertNames(("mlp.experts",), {"gate_proj": "gate", "up_proj": "up",
                                                         "down_proj": "down"}))
OLMOE = replace(QWEN_MOE, expert_size=lambda c: c.intermediate_size)
# Qwen2-MoE: the routed experts, the shared expert (a dense SwiGLU beside them) and the dense
# MLPs of ``mlp_only_layers``, each present in some layers only (``optional``)
_SHARED = {"mlp.shared_expert.gate_proj": ("shared_gate_proj",),
           "mlp.shared_expert.up_proj": ("shared_up_proj",),
           "mlp.shared_expert.down_proj": ("shared_down_proj",)}
QWEN2_MOE = replace(QWEN_MOE, modules={**_LLAMA_ATTN, **_SHARED, **_LLAMA_MLP},
                    note=" (gate/up/down: the shared expert's and the dense layers'; and "
                         "the experts' gate/up/down projections)", optional=True)
# DeepSeek V2/V3: the latent attention's projections but kv_b_proj (absorbed into the query and
# output products), the MLPs (the dense layers', the shared experts', the routed experts')
DEEPSEEK = replace(QWEN_MOE, modules={
    "self_attn.q_proj": ("mla_q",), "self_attn.q_a_proj": ("mla_q_a",),
    "self_attn.q_b_proj": ("mla_q_b",), "self_attn.kv_a_proj_with_mqa": ("mla_kv_a",),
    "self_attn.o_proj": O,
    "mlp.shared_experts.gate_proj": ("shared_gate_proj",),
    "mlp.shared_experts.up_proj": ("shared_up_proj",),
    "mlp.shared_experts.down_proj": ("shared_down_proj",), **_LLAMA_MLP},
    num_experts=lambda c: c.n_routed_experts, optional=True,
    note=" (and the experts' gate/up/down projections; not kv_b_proj, which the latent "
         "attention folds into its query and output products)")

# Mamba2 mixers' projections (``layers/mamba_mixer.py``): in_proj's five parts in the checkpoint's
# row order, out_proj whole; a hybrid's attention layers take the attention modules, its Mamba
# layers these (``lora/layers.py`` wraps what a layer has)
_MAMBA = {"mamba.in_proj": ("mamba_z", "mamba_x", "mamba_B", "mamba_C", "mamba_dt"),
          "mamba.out_proj": ("mamba_out",)}
BAMBA = Family("model.layers", {**_LLAMA_ATTN, **_LLAMA_MLP, **_MAMBA},
               rename=lambda name: name.replace(".feed_forward.", ".mlp."))
# Qwen3-Next: gated attention (q_proj's rows hold each head's query and output gate, as our
# qkv_proj's first slice does) and the gated DeltaNet's projections, whose fused B rows are
# grouped by key head as the checkpoint's weights (cut as they are on load)
_DELTANET = {"linear_attn.in_proj_qkvz": ("dn_q", "dn_k", "dn_v", "dn_z"),
             "linear_attn.in_proj_ba": ("dn_b", "dn_a"), "linear_attn.out_proj": ("dn_out",)}


def _deltanet_split(sizes_of):
    def split(config, tensor):
        from tessellm.quantization.stored_parts import split_rows

        return split_rows("weight", tensor, sizes_of(config, config.linear_num_value_heads
                                                     // config.linear_num_key_heads),
                          config.linear_num_key_heads)
    return split


QWEN3_NEXT = Family(
    "model.layers", {**_LLAMA_ATTN, **_DELTANET},
    splits={"linear_attn.in_proj_qkvz": _deltanet_split(lambda c, per: [
        c.linear_key_head_dim, c.linear_key_head_dim, per * c.linear_value_head_dim,
        per * c.linear_value_head_dim]),
            "linear_attn.in_proj_ba": _deltanet_split(lambda c, per: [per, per])},
    note=" (attention and gated DeltaNet projections: LoRA on the experts is not supported)")
# Nemotron-H: one mixer a layer (``backbone.layers.{i}.mixer``: attention, relu2 MLP, Mamba2 or
# MoE), each layer slotted for the kind it has (``optional``); MoE layers take none, nor the
# Mamba out_proj (peft refuses it for Nemotron-H: HF's fused path reads its weight directly)
NEMOTRON_H = Family(
    "model.layers",  # transformers 5's in-memory names; adapters of older ones say "backbone"
    {"mixer.q_proj": ("mixer_q",), "mixer.k_proj": ("mixer_k",), "mixer.v_proj": ("mixer_v",),
     "mixer.o_proj": ("mixer_o",), "mixer.up_proj": ("mixer_up",),
     "mixer.down_proj": ("mixer_down",),
     "mixer.in_proj": ("mixer_z", "mixer_x", "mixer_B", "mixer_C", "mixer_dt")},
    optional=True, rename=lambda name: name.replace("backbone.layers.", "model.layers."),
    note=" (attention, MLP and Mamba mixers: LoRA on the MoE layers is not supported)")
GRANITE_HYBRID = Family("model.layers", {**_LLAMA_ATTN, **_MAMBA},
                        note=" (attention and Mamba projections: LoRA on the experts and the "
                             "shared MLP is not supported)")

# EXAONE 3: adapters trained on transformers 5 (its Llama model) name Llama's modules; those
# trained on the original remote code theirs (``attn.attention.out_proj``, ``mlp.c_fc_0``)
EXAONE = Family("model.layers", LLAMA.modules, rename=_exaone_names)

# HF architecture -> layout. A head other than the LM head (``...ForSequenceClassification``,
# a bare ``...Model``) has its ``...ForCausalLM``'s layout (``family_of``).
FAMILIES = {
    **{arch: LLAMA for arch in (
        "LlamaForCausalLM", "InternLM3ForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
        "Qwen3ForCausalLM", "SmolLM3ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM",
        "Gemma3ForCausalLM", "GraniteForCausalLM", "OlmoForCausalLM", "Olmo2ForCausalLM",
        "Olmo3ForCausalLM", "CohereForCausalLM", "Exaone4ForCausalLM", "StableLmForCausalLM",
        "SeedOssForCausalLM", "Ernie4_5ForCausalLM", "HunYuanDenseV1ForCausalLM",
        "Cohere2ForCausalLM", "Ministral3ForCausalLM")},
    "ApertusForCausalLM": APERTUS,
    "ExaoneForCausalLM": EXAONE,
    "Phi3ForCausalLM": PHI3,
    "GlmForCausalLM": GLM, "Glm4ForCausalLM": GLM,
    "PhiForCausalLM": PHI,
    "Starcoder2ForCausalLM": STARCODER2,
    "GPTJForCausalLM": GPTJ,
    "GPTNeoXForCausalLM": GPT_NEOX,
    "FalconForCausalLM": FALCON,
    "GPTBigCodeForCausalLM": GPT_BIGCODE,
    "MixtralForCausalLM": MIXTRAL, "Qwen3MoeForCausalLM": QWEN_MOE, "OlmoeForCausalLM": OLMOE,
    "Qwen2MoeForCausalLM": QWEN2_MOE,
    "DeepseekV2ForCausalLM": DEEPSEEK, "DeepseekV3ForCausalLM": DEEPSEEK,
    "BambaForCausalLM": BAMBA,
    "GraniteMoeHybridForCausalLM": GRANITE_HYBRID,
    "Qwen3NextForCausalLM": QWEN3_NEXT,
    "NemotronHForCausalLM": NEMOTRON_H,
    **{arch: MOE_ATTENTION for arch in (
        "GraniteMoeForCausalLM", "GraniteMoeSharedForCausalLM",
        "GptOssForCausalLM", "Llama4ForCausalLM", "Glm4MoeForCausalLM",
        "Ernie4_5_MoeForCausalLM", "HunYuanMoEV1ForCausalLM", "Dots1ForCausalLM")},
}


def family_of(archs: list[str]) -> tuple[str, Optional[Family]]:
    """The first of ``archs`` with a LoRA layout, and it; else (the first, None)."""
    for arch in archs:
        for causal in (arch, _causal_lm(arch)):
            if causal in FAMILIES:
                return arch, FAMILIES[causal]
    return (archs[0] if archs else "(no architecture in config)"), None


def _causal_lm(arch: str) -> str:
    for head in ("ForSequenceClassification", "Model"):
        if arch.endswith(head):
            return arch[:-len(head)] + "ForCausalLM"
    return arch


def supported_architectures() -> str:
    """The architectures with LoRA, for a refusal."""
    return ", ".join(sorted(FAMILIES))
