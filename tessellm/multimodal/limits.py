"""What a model takes besides text, and the engine arguments about it: ``limit_mm_per_prompt``
(vLLM's flag), ``allowed_local_media_path``, and the features that do not combine with image
inputs yet (refused by name at start-up)."""

from __future__ import annotations

import json
import os
from typing import Optional

from tessellm.json_arg import json_object_arg

MODALITIES = ("image", "video", "audio")


def parse_mm_limits(value) -> dict[str, int]:
    """``{"image": 2}``, its JSON, or vLLM's older ``image=2`` form; None: {}."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"limit_mm_per_prompt is not valid JSON ({exc.msg}); give e.g. "
                                 "'{\"image\": 2}'.") from None
        else:
            try:
                value = {k.strip(): int(v) for k, v in (p.split("=") for p in text.split(","))}
            except ValueError:
                raise ValueError(f"limit_mm_per_prompt {value!r} is not understood; give JSON "
                                 "such as '{\"image\": 2}'.") from None
    if not isinstance(value, dict):
        raise ValueError(f"limit_mm_per_prompt must be a mapping such as {{\"image\": 2}}, got "
                         f"{type(value).__name__}.")
    for key, n in value.items():
        if key not in MODALITIES:
            raise ValueError(f"limit_mm_per_prompt names {key!r}; tessellm takes "
                             f"{', '.join(MODALITIES)} inputs.")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"limit_mm_per_prompt[{key!r}] must be a count >= 0, got {n!r}.")
    return dict(value)


def parse_mm_processor_kwargs(value) -> dict:
    """``--mm-processor-kwargs``: a dict or its JSON; None: {}. The keys are checked against the
    model's image front end at start-up (``ImageProcessor.check_mm_kwargs``)."""
    return dict(json_object_arg(value or None, "mm_processor_kwargs", '{"max_pixels": 200704}'))


def default_mm_kwargs(args, model_path: str, hf_config) -> dict:
    """``--mm-processor-kwargs`` checked at start-up against the model's image front end (its
    keys and values, as a request's would be): one error naming the key and the family."""
    kwargs = parse_mm_processor_kwargs(getattr(args, "mm_processor_kwargs", None))
    if not kwargs:
        return {}
    limits = model_mm_limits(hf_config, args)
    if not limits.get("image"):
        raise ValueError(f"mm_processor_kwargs {kwargs} given, but {model_path} takes no images here; "
                         "leave mm_processor_kwargs out.")
    from tessellm.multimodal.processor import image_processor

    image_processor(model_path, limits["image"], limits.get("video", 0)).check_default_mm_kwargs(kwargs)
    return kwargs


def check_media_path(path: Optional[str]) -> None:
    if path is not None and not os.path.isdir(path):
        raise ValueError(f"allowed_local_media_path {path!r} is not a directory; give the "
                         "directory whose files chat messages may name as file:// URLs.")


def takes_images(hf_config) -> bool:
    archs = "".join(getattr(hf_config, "architectures", None) or ())
    return getattr(hf_config, "vision_config", None) is not None and any(
        family in archs for family in ("Llava", "Qwen2VL", "Qwen2_5_VL", "Gemma3ForConditional",
                                          "Mistral3ForConditional", "Qwen3VLForConditional",
                                          "Qwen3VLMoeForConditional",
                                          "Llama4ForConditional"))


def takes_audio(hf_config) -> bool:
    """Qwen2-Audio: audio clips, no images."""
    from tessellm.multimodal.qwen2_audio_inputs import is_qwen2_audio

    return is_qwen2_audio(hf_config) and getattr(hf_config, "audio_config", None) is not None


def takes_mm_inputs(hf_config) -> bool:
    """Images (and videos) or audio: the model keeps an encoder cache and budget."""
    return takes_images(hf_config) or takes_audio(hf_config)


def _audio_limits(hf_config, given: dict) -> dict[str, int]:
    other = sorted(k for k, n in given.items() if k != "audio" and n)
    if other:
        raise ValueError(f"limit_mm_per_prompt names {', '.join(map(repr, other))} but "
                         f"{hf_config.architectures[0]} takes audio only; give {{\"audio\": n}}.")
    return {"audio": given.get("audio", 1)}


def model_mm_limits(hf_config, args) -> dict[str, int]:
    """What the model takes per prompt: ``{"image": n}`` (default 1; the Qwen2/2.5/3-VL
    families also ``"video"``, default 1) or {} for text only; ``{"image": 0}`` for an image-text
    checkpoint served text-only (``text_only.py``). A video limit for a model that takes no
    videos is refused."""
    from tessellm.multimodal.qwen2_vl_inputs import takes_videos
    from tessellm.multimodal.text_only import image_text_architecture

    if image_text_architecture(hf_config) is not None:
        return {"image": 0}
    given = parse_mm_limits(getattr(args, "limit_mm_per_prompt", None))
    if takes_audio(hf_config):
        return _audio_limits(hf_config, given)
    if not takes_images(hf_config):
        return {}
    if given.get("audio"):
        raise ValueError(f"limit_mm_per_prompt names 'audio' but {hf_config.architectures[0]} "
                         "takes no audio in tessellm (Qwen2-Audio does); drop it.")
    given.pop("audio", None)
    if not takes_videos(hf_config):
        if given.get("video"):
            raise ValueError(f"limit_mm_per_prompt names 'video' but {hf_config.architectures[0]} "
                             "takes no videos in tessellm (the Qwen2/2.5/3-VL families do); drop it.")
        given.pop("video", None)
        return {"image": 1, **given}
    return {"image": 1, "video": 1, **given}


# Proposers that read token ids only: with images they propose as for text (the target's
# verify pass sees the image features, which reached the KV cache in prefill); a draft model
# is a text model over the same ids (placeholders as plain tokens, its own 1-D positions), as
# vLLM's. EAGLE and MTP would need the target's hidden states over the image features.
TOKEN_ONLY_SPEC_METHODS = ("ngram", "replay", "draft_model")


def _spec_method(value) -> Optional[str]:
    from tessellm.spec_decode.config import parse_speculative_config

    config = parse_speculative_config(value)
    return None if config is None else config.method


# Image models whose tower runs on the first pipeline stage (the others get hidden states).
# (Qwen3-VL: its DeepStack layers, the first few, must all be on the first stage.)
PIPELINE_ARCHITECTURES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
                          "Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                          "Mistral3ForConditionalGeneration", "Llama4ForConditionalGeneration",
                          "Gemma3ForConditionalGeneration", "Qwen3VLForConditionalGeneration",
                          "Qwen3VLMoeForConditionalGeneration")


def _pipelines_images(hf_config) -> bool:
    archs = getattr(hf_config, "architectures", None) or ()
    return any(a in PIPELINE_ARCHITECTURES for a in archs)


def check_multimodal_args(hf_config, args) -> None:
    """Refuse, at start-up, what does not combine with an image model yet (LoRA does: on the
    language model, ``lora/shapes.py``; speculative decoding with a token-only proposer).
    Qwen2-Audio: the same refusals, pipeline parallelism too."""
    if not takes_mm_inputs(hf_config):
        return
    from tessellm.pooling.config import resolve_runner

    method = _spec_method(args.speculative_config)
    for name, unsupported in ((f"speculative_config method {method!r}",
                               method is not None and method not in TOKEN_ONLY_SPEC_METHODS),
                              ("pipeline_parallel_size > 1", args.pipeline_parallel_size > 1
                               and not _pipelines_images(hf_config)),
                              ("runner='pooling'", resolve_runner(args, hf_config) == "pooling")):
        if unsupported and takes_audio(hf_config):
            raise ValueError(f"{name} does not combine with an audio model "
                             f"({hf_config.architectures[0]}) yet; run it without.")
        if unsupported:
            raise ValueError(f"{name} does not combine with an image model "
                             f"({hf_config.architectures[0]}) yet; run it without, or serve "
                             "the model text-only with limit_mm_per_prompt {\"image\": 0} "
                             "(--limit-mm-per-prompt '{\"image\": 0}'): its language model "
                             "alone, with that model's features.")
