"""An image-text checkpoint served as its language model: ``limit_mm_per_prompt={"image": 0}``
(``--limit-mm-per-prompt '{"image": 0}'``), as vLLM does.

With images off the engine serves the checkpoint's *text family*: the config it builds from is
the language model's (``text_config``, its architecture the family's ``*ForCausalLM``), so the
vision tower and projector are never built, their tensors are skipped at load, there is no
encoder budget or cache, and every feature the text family has (pipeline parallelism, LoRA,
speculative decoding) works as it does for the text model::

    Llama4ForConditionalGeneration  ->  Llama4ForCausalLM    (text_config: Llama4TextConfig)
    Gemma3ForConditionalGeneration  ->  Gemma3ForCausalLM
    Qwen2VL / Qwen2_5_VL            ->  Qwen2ForCausalLM     (M-RoPE of a text prompt: every
    Qwen3VL                         ->  Qwen3ForCausalLM      axis holds the 1-D position, so
    Qwen3VLMoe                      ->  Qwen3MoeForCausalLM   it is the plain rotary; the MoE
                                                              router renormalizes, as HF's)
    Llava / LlavaNext / Mistral3    ->  their language model's family (text_config.model_type)

Checkpoint names, as the image-text classes read them, and what the text family reads::

    language_model.model.layers.0...   ->  model.layers.0...   (Scout / Maverick, llava-hf)
    model.language_model.layers.0...   ->  model.layers.0...   (transformers >= 4.52 saves)
    language_model.lm_head.weight      ->  lm_head.weight
    model.layers.0... / lm_head.weight ->  unchanged           (Qwen2-VL's older saves)
    vision_model.* vision_tower.* visual.* multi_modal_projector.* image_newline  ->  skipped

The front end still knows the checkpoint takes images (``EngineInfo.mm_limits`` is
``{"image": 0}``): it uses the processor's chat template, refuses image placeholder ids in a
text prompt, and refuses an image with one sentence naming the flag (``refuse_images``).
"""

from __future__ import annotations

import copy
from typing import Iterable, Iterator, Optional

import torch

# Set on the served text config: the image-text architecture it was taken from.
IMAGE_TEXT_ARCHITECTURE = "tessellm_image_text_architecture"

_TEXT_FAMILIES = {
    "Llama4ForConditionalGeneration": "Llama4ForCausalLM",
    "Gemma3ForConditionalGeneration": "Gemma3ForCausalLM",
    "Qwen2VLForConditionalGeneration": "Qwen2ForCausalLM",
    "Qwen2_5_VLForConditionalGeneration": "Qwen2ForCausalLM",
    "Qwen3VLForConditionalGeneration": "Qwen3ForCausalLM",
    "Qwen3VLMoeForConditionalGeneration": "Qwen3MoeForCausalLM",
}
# Values the text family reads that the image-text model has built in.
_TEXT_FAMILY_VALUES = {
    "Qwen3VLMoeForConditionalGeneration": {"norm_topk_prob": True},  # HF's router always does
}
_BY_TEXT_MODEL_TYPE = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
                       "Mistral3ForConditionalGeneration")
_VISION_PARTS = ("vision_model", "vision_tower", "visual", "multi_modal_projector",
                 "image_newline")  # LLaVA-NeXT: the row-end feature
_PARTS = _VISION_PARTS + ("language_model",)
# Top-level values the language model's config may lack (transformers keeps them there).
_INHERITED = ("tie_word_embeddings", "dtype", "quantization_config")


def images_off(hf_config, limit_mm_per_prompt) -> bool:
    """An image-text checkpoint with ``limit_mm_per_prompt`` image 0 (and no videos)."""
    from tessellm.multimodal.limits import parse_mm_limits, takes_images

    limits = parse_mm_limits(limit_mm_per_prompt)
    return takes_images(hf_config) and limits.get("image") == 0 and not limits.get("video")


def text_only_config(hf_config):
    """The language model's config (a copy) as a text checkpoint's: its family's architecture,
    the top-level values it lacks, and the image-text architecture it came from."""
    arch = hf_config.architectures[0]
    text = copy.copy(hf_config.get_text_config())
    text.architectures = [_text_family(arch, text)]
    for name in _INHERITED:
        if getattr(text, name, None) is None and getattr(hf_config, name, None) is not None:
            setattr(text, name, getattr(hf_config, name))
    if getattr(hf_config, "tie_word_embeddings", None) is not None:  # HF ties as the top says
        text.tie_word_embeddings = hf_config.tie_word_embeddings
    for name, value in _TEXT_FAMILY_VALUES.get(arch, {}).items():
        setattr(text, name, value)
    setattr(text, IMAGE_TEXT_ARCHITECTURE, arch)
    return text


def image_text_architecture(hf_config) -> Optional[str]:
    """The image-text architecture a text-only config was taken from (None: not one)."""
    return getattr(hf_config, IMAGE_TEXT_ARCHITECTURE, None)


def text_family(hf_config) -> str:
    """The text family's architecture of an image-text config (``Qwen2ForCausalLM`` for
    Qwen2-VL): LoRA with images on adapts that family's modules of the language model."""
    return _text_family(hf_config.architectures[0], hf_config.get_text_config())


def _text_family(arch: str, text) -> str:
    if arch in _TEXT_FAMILIES:
        return _TEXT_FAMILIES[arch]
    if arch in _BY_TEXT_MODEL_TYPE:
        from tessellm.models.llava import _LANGUAGE_MODELS
        from tessellm.models.mistral3 import LANGUAGE_MODELS

        models = LANGUAGE_MODELS if arch == "Mistral3ForConditionalGeneration" else _LANGUAGE_MODELS
        model_type = getattr(text, "model_type", None)
        if model_type in models:
            return models[model_type].__name__
        raise ValueError(f"{arch} with a {model_type!r} language model is not supported; "
                         f"supported: {', '.join(sorted(models))}.")
    raise ValueError(f"{arch} has no text-only mode in tessellm; serve it with images "
                     "(limit_mm_per_prompt image >= 1).")


def text_weights(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The language model's tensors of an image-text checkpoint under the text family's names
    (module docstring); the vision tower's and projector's are skipped, unread where the
    stream is lazy."""
    for name, tensor in weights:
        ours = text_name(name)
        if ours is not None:
            yield ours, tensor


def text_name(name: str) -> Optional[str]:
    """A checkpoint (or adapter) name of the image-text model -> the text family's; None for
    the vision tower's and the projector's."""
    short = name[len("model."):] if name.startswith("model.") and \
        name[len("model."):].startswith(_PARTS) else name
    part, _, rest = short.partition(".")
    if part in _VISION_PARTS:
        return None
    if part == "language_model":
        return rest if rest.startswith(("model.", "lm_head.")) else "model." + rest
    return short


def lora_key(key: str) -> Optional[str]:
    """A PEFT adapter tensor trained on the image-text model (``base_model.model.`` then its
    module path, e.g. ``model.language_model.layers.0.self_attn.q_proj.lora_A.weight``) under
    the text family's path; None for one of the vision tower (not built with images off)."""
    prefix = "base_model.model."
    ours = text_name(key[len(prefix):] if key.startswith(prefix) else key)
    return None if ours is None else prefix + ours


def refuse_images(model_path: str) -> ValueError:
    return ValueError(f"Images are turned off for {model_path} (limit_mm_per_prompt "
                      "{\"image\": 0}): it is served as a text model, without its vision tower. "
                      "Send text only, or restart with --limit-mm-per-prompt '{\"image\": 1}' "
                      "(limit_mm_per_prompt={\"image\": 1}) to take images.")
