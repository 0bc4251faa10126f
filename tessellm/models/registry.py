"""HF architecture name -> model class."""

from __future__ import annotations

from tessellm.models import gemma, gemma2
from tessellm.models import gpt_oss
from tessellm.models import gemma3_mm, llava_next, qwen2_audio, qwen2_vl
from tessellm.models import ministral3, mistral3, qwen3_vl
from tessellm.models import cohere2, deepseek_v2, ernie4_5, ernie4_5_moe, glm4_moe
from tessellm.models import apertus, dots1, hunyuan, hunyuan_moe, seed_oss
from tessellm.models import bamba, falcon_h1, granite_moe_hybrid, mamba2, nemotron_h
from tessellm.models import qwen3_next
from tessellm.models import llama4, llama4_mm
from tessellm.models import bert, modernbert
from tessellm.models import (cohere, exaone, exaone4, falcon, gemma3, glm, gpt_bigcode, gpt_neox,
                             gptj, granite, granite_moe, llama, llava, moe, olmo, olmo2, olmo3,
                             olmoe, phi, phi3, phimoe, seq_cls, smollm3, stablelm, starcoder2)

_MODELS = {
    "LlamaForCausalLM": llama.LlamaForCausalLM,
    "InternLM3ForCausalLM": llama.LlamaForCausalLM,  # transformers 5 serves it as Llama
    "MistralForCausalLM": llama.MistralForCausalLM,
    "Qwen2ForCausalLM": llama.Qwen2ForCausalLM,
    "Qwen3ForCausalLM": llama.Qwen3ForCausalLM,
    "SmolLM3ForCausalLM": smollm3.SmolLM3ForCausalLM,
    "SeedOssForCausalLM": seed_oss.SeedOssForCausalLM,
    "ApertusForCausalLM": apertus.ApertusForCausalLM,
    "HunYuanDenseV1ForCausalLM": hunyuan.HunYuanDenseV1ForCausalLM,
    "HunYuanMoEV1ForCausalLM": hunyuan_moe.HunYuanMoEV1ForCausalLM,
    "Llama4ForCausalLM": llama4.Llama4ForCausalLM,
    "Llama4ForConditionalGeneration": llama4_mm.Llama4ForConditionalGeneration,
    "GemmaForCausalLM": gemma.GemmaForCausalLM,
    "Gemma2ForCausalLM": gemma2.Gemma2ForCausalLM,
    "Gemma3ForCausalLM": gemma3.Gemma3ForCausalLM,
    "GlmForCausalLM": glm.GlmForCausalLM,
    "Glm4ForCausalLM": glm.Glm4ForCausalLM,
    "PhiForCausalLM": phi.PhiForCausalLM,
    "Phi3ForCausalLM": phi3.Phi3ForCausalLM,
    "GraniteForCausalLM": granite.GraniteForCausalLM,
    "OlmoForCausalLM": olmo.OlmoForCausalLM,
    "Olmo2ForCausalLM": olmo2.Olmo2ForCausalLM,
    "Olmo3ForCausalLM": olmo3.Olmo3ForCausalLM,
    "CohereForCausalLM": cohere.CohereForCausalLM,
    "Cohere2ForCausalLM": cohere2.Cohere2ForCausalLM,
    "ExaoneForCausalLM": exaone.ExaoneForCausalLM,
    "FalconForCausalLM": falcon.FalconForCausalLM,
    "Exaone4ForCausalLM": exaone4.Exaone4ForCausalLM,
    "GPTNeoXForCausalLM": gpt_neox.GPTNeoXForCausalLM,
    "GPTBigCodeForCausalLM": gpt_bigcode.GPTBigCodeForCausalLM,
    "GPTJForCausalLM": gptj.GPTJForCausalLM,
    "StableLmForCausalLM": stablelm.StableLmForCausalLM,
    "Starcoder2ForCausalLM": starcoder2.Starcoder2ForCausalLM,
    "MixtralForCausalLM": moe.MixtralForCausalLM,
    "Qwen2MoeForCausalLM": moe.Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": moe.Qwen3MoeForCausalLM,
    "GraniteMoeForCausalLM": granite_moe.GraniteMoeForCausalLM,
    "GraniteMoeSharedForCausalLM": granite_moe.GraniteMoeSharedForCausalLM,
    "OlmoeForCausalLM": olmoe.OlmoeForCausalLM,
    "PhimoeForCausalLM": phimoe.PhimoeForCausalLM,
    "GptOssForCausalLM": gpt_oss.GptOssForCausalLM,
    "DeepseekV2ForCausalLM": deepseek_v2.DeepseekV2ForCausalLM,
    "DeepseekV3ForCausalLM": deepseek_v2.DeepseekV3ForCausalLM,
    "Glm4MoeForCausalLM": glm4_moe.Glm4MoeForCausalLM,
    "Dots1ForCausalLM": dots1.Dots1ForCausalLM,
    "Ernie4_5ForCausalLM": ernie4_5.Ernie4_5ForCausalLM,
    "Ernie4_5_MoeForCausalLM": ernie4_5_moe.Ernie4_5_MoeForCausalLM,
    "Mamba2ForCausalLM": mamba2.Mamba2ForCausalLM,
    "GraniteMoeHybridForCausalLM": granite_moe_hybrid.GraniteMoeHybridForCausalLM,
    "BambaForCausalLM": bamba.BambaForCausalLM,
    "Qwen3NextForCausalLM": qwen3_next.Qwen3NextForCausalLM,
    "NemotronHForCausalLM": nemotron_h.NemotronHForCausalLM,
    "FalconH1ForCausalLM": falcon_h1.FalconH1ForCausalLM,
    "LlavaForConditionalGeneration": llava.LlavaForConditionalGeneration,
    "LlavaNextForConditionalGeneration": llava_next.LlavaNextForConditionalGeneration,
    "Qwen2VLForConditionalGeneration": qwen2_vl.Qwen2VLForConditionalGeneration,
    "Qwen2AudioForConditionalGeneration": qwen2_audio.Qwen2AudioForConditionalGeneration,
    "Qwen2_5_VLForConditionalGeneration": qwen2_vl.Qwen2_5_VLForConditionalGeneration,
    "Gemma3ForConditionalGeneration": gemma3_mm.Gemma3ForConditionalGeneration,
    "Mistral3ForConditionalGeneration": mistral3.Mistral3ForConditionalGeneration,
    "Ministral3ForCausalLM": ministral3.Ministral3ForCausalLM,
    "Qwen3VLForConditionalGeneration": qwen3_vl.Qwen3VLForConditionalGeneration,
    "Qwen3VLMoeForConditionalGeneration": qwen3_vl.Qwen3VLMoeForConditionalGeneration,
    # classifiers / cross-encoders: a pooling engine's classify and score (docs/pooling.md)
    "LlamaForSequenceClassification": seq_cls.LlamaForSequenceClassification,
    "MistralForSequenceClassification": seq_cls.MistralForSequenceClassification,
    "Qwen2ForSequenceClassification": seq_cls.Qwen2ForSequenceClassification,
    "Qwen3ForSequenceClassification": seq_cls.Qwen3ForSequenceClassification,
    # encoder-only (bidirectional): embeddings and cross-encoders (models/bert.py)
    "BertModel": bert.BertModel,
    "RobertaModel": bert.RobertaModel,
    "XLMRobertaModel": bert.RobertaModel,
    "BertForSequenceClassification": bert.BertForSequenceClassification,
    "RobertaForSequenceClassification": bert.RobertaForSequenceClassification,
    "XLMRobertaForSequenceClassification": bert.RobertaForSequenceClassification,
    "ModernBertModel": modernbert.ModernBertModel,
    "ModernBertForSequenceClassification": modernbert.ModernBertForSequenceClassification,
}

# an architecture whose class depends on its vision tower: (architecture, vision model_type)
_BY_VISION_TOWER = {
    ("LlavaForConditionalGeneration", "pixtral"): mistral3.PixtralLlavaForConditionalGeneration,
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def model_class(config, pooling: bool = False):
    """``pooling``: an embedding model, whose checkpoint may be a bare ``LlamaModel`` /
    ``Qwen3Model`` / ... (no LM head): served by the family's ``*ForCausalLM`` class."""
    archs = list(getattr(config, "architectures", None) or [])
    tower = getattr(getattr(config, "vision_config", None), "model_type", None)
    for arch in archs:
        if (arch, tower) in _BY_VISION_TOWER:
            return _BY_VISION_TOWER[arch, tower]
        if arch in _MODELS:
            return _MODELS[arch]
        causal = arch[:-len("Model")] + "ForCausalLM" if arch.endswith("Model") else None
        if pooling and causal in _MODELS:
            return _MODELS[causal]
    raise ValueError(f"Model architecture {archs or '(none in config)'} is not supported. "
                     f"Supported: {', '.join(supported_architectures())}.")
