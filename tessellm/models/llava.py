"""LLaVA (1.5 style): a CLIP vision tower, a two-layer projector and a llama-family language
model. The language model is tessellm's own (``models/llama.py``), with its paged attention;
the image tokens enter it as embeddings::

    prompt ids    [u  u  <img> <img> ... <img>  q  q]      (the processor expanded <image>
                        \\____ N placeholders ___/           to N = feature_size tokens)
    embeddings    [e  e  f0    f1    ... fN-1   e  e]      f = projector(tower(pixels))[layer]

``forward`` takes the placeholder rows of the step and their features (``mm_embeds``) from
the runner's encoder cache (``tessellm.multimodal.encoder_cache``), which calls
``encode_images`` when a step first reaches an image. vLLM's and HF's LLaVA do the same merge.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

from tessellm.layers.context import ModelContext
from tessellm.layers.linear import materialize
from tessellm.models import llama
from tessellm.models.clip import CLIPVisionTower, activation
from tessellm.models.image_embeds import ImageTextModel

# text_config.model_type -> the tessellm class of the language model
_LANGUAGE_MODELS = {"llama": llama.LlamaForCausalLM, "mistral": llama.MistralForCausalLM,
                    "qwen2": llama.Qwen2ForCausalLM}


def image_token_id(config) -> int:
    """The placeholder id (``image_token_index`` in older configs, ``image_token_id`` in newer)."""
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError("The LLaVA config has no image_token_index / image_token_id; is it complete?")


def image_feature_size(config) -> int:
    """Placeholder tokens per image: the patches, plus the class token under the "full"
    feature select strategy ("default" drops it)."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (1 if feature_select_strategy(config) == "full" else 0)


def feature_select_strategy(config) -> str:
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy {strategy!r} is not supported; "
                         "LLaVA uses 'default' (drop the class token) or 'full'.")
    return strategy


class LlavaProjector(nn.Module):
    """linear_1 -> act -> linear_2: vision features to the language model's hidden size."""

    def __init__(self, vision_hidden: int, text_hidden: int, act: str, bias: bool):
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden, text_hidden, bias=bias)
        self.act = activation(act)
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaForConditionalGeneration(ImageTextModel):
    """``forward`` (the image features at their placeholder rows), ``compute_logits`` and
    ``attention_layers``: ``ImageTextModel``'s."""

    def __init__(self, config, ctx: ModelContext):
        super().__init__()
        self.config = config
        text, vision = config.text_config, config.vision_config
        if getattr(vision, "model_type", "clip_vision_model") != "clip_vision_model":
            raise ValueError(f"LLaVA with a {vision.model_type!r} vision tower is not supported; "
                             "tessellm runs CLIP vision towers (LLaVA-1.5).")
        lm_class = _LANGUAGE_MODELS.get(getattr(text, "model_type", "llama"))
        if lm_class is None:
            raise ValueError(f"LLaVA with a {text.model_type!r} language model is not supported; "
                             f"supported: {', '.join(sorted(_LANGUAGE_MODELS))}.")
        # pipeline parallelism: the tower and projector on the first stage (which embeds the
        # prompt), none on the others; the runner keeps its encoder cache there only
        self.tower_here = ctx.pp.is_first
        self.image_token_id = image_token_id(config)
        self.feature_size = image_feature_size(config)
        self.drop_cls = feature_select_strategy(config) == "default"
        layers = config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        if self.tower_here:
            self.vision_tower = CLIPVisionTower(vision, layers)
            self.multi_modal_projector = LlavaProjector(
                vision.hidden_size * len(layers), text.hidden_size,
                getattr(config, "projector_hidden_act", "gelu"),
                bool(getattr(config, "multimodal_projector_bias", True)))
        self.language_model = lm_class(text, ctx)

    # -- what the runner calls -------------------------------------------------------------

    def encode_images(self, pixels: torch.Tensor, image_sizes=None) -> torch.Tensor:
        """``[N, 3, H, W]`` preprocessed images -> ``[N, feature_size, text hidden]``
        (``image_sizes``: unused here; LLaVA-NeXT's tiles need them)."""
        feats = self.vision_tower(pixels)
        if self.drop_cls:
            feats = feats[:, 1:]
        return self.multi_modal_projector(feats)

    def dummy_images(self, num_tokens: int, device) -> tuple[torch.Tensor, list]:
        """Blank images covering ``num_tokens`` placeholders whole, and their sizes, for
        ``encode_images`` in the memory profile (``EncoderCache.profile``)."""
        tower = self.vision_tower.embeddings
        n = max(1, -(-num_tokens // self.feature_size))
        side = tower.image_size
        pixels = torch.zeros(n, tower.patch_embedding.in_channels, side, side, device=device)
        return pixels, [[side, side]] * n

    # -- weights ---------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF names, in either layout: llava-hf's (``vision_tower.vision_model.*``,
        ``multi_modal_projector.*``, ``language_model.model.*``, ``language_model.lm_head.*``)
        or transformers 5's (``model.vision_tower.*``, ``model.multi_modal_projector.*``,
        ``model.language_model.*``, ``lm_head.*``)."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()

        def text_weights():  # the stream stays lazy: a file's tensors are read while it is open
            for name, tensor in weights:
                routed = route_weight(name)
                if routed is None:
                    continue
                part, rest = routed
                if part == "language_model":
                    yield rest, tensor
                    continue
                if not self.tower_here:  # a later pipeline stage: the first one's
                    continue
                target = f"{part}.{rest}" if rest else part
                if target not in params:
                    if part == "image_newline":
                        raise ValueError("This checkpoint has an image_newline (LLaVA-NeXT); its "
                                         "config.json should name LlavaNextForConditionalGeneration.")
                    if part == "vision_tower" and _unused_vision_weight(rest, len(self.vision_tower.encoder.layers)):
                        continue  # post_layernorm, layers past the selected one
                    raise ValueError(f"Checkpoint tensor {name!r} has no place in "
                                     "LlavaForConditionalGeneration; is this the right architecture?")
                llama._copy(params[target], materialize(tensor), name)
                loaded.add(target)

        loaded |= {f"language_model.{n}" for n in self.language_model.load_weights(text_weights())}
        return loaded


def route_weight(name: str) -> Optional[tuple[str, str]]:
    """(our submodule or parameter, the rest of the name in its own terms) for a checkpoint
    name of the layouts LLaVA and Gemma 3 share (``vision_tower.vision_model.*``,
    ``multi_modal_projector.*``, ``language_model.*``, or transformers 5's ``model.*`` ones)."""
    if name.startswith("model."):  # transformers 5 layout
        name = name[len("model."):]
        if name.startswith("language_model."):
            return "language_model", name[len("language_model."):]
    if name.startswith("lm_head."):
        return "language_model", name
    for part in ("vision_tower", "multi_modal_projector", "language_model"):
        if name.startswith(part + "."):
            rest = name[len(part) + 1:]
            if part == "vision_tower" and rest.startswith("vision_model."):
                rest = rest[len("vision_model."):]
            return part, rest
    if name == "image_newline":  # LLaVA-NeXT's row separator
        return "image_newline", ""
    return None


def _unused_vision_weight(rest: str, built_layers: int) -> bool:
    if rest.startswith("post_layernorm."):
        return True
    if rest.startswith("encoder.layers."):
        return int(rest.split(".")[2]) >= built_layers
    return False
