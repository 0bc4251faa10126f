"""Mistral 3 (``Mistral3ForConditionalGeneration``: Mistral Small 3.1 / 3.2): a Pixtral vision
encoder (``pixtral_vision.py``), a projector that merges each 2x2 block of patches into one
token, and a Mistral language model (tessellm's own, paged attention).

An image of ``rows x cols`` merged patches stands in the prompt as its rows of ``[IMG]``, each
row closed by ``[IMG_BREAK]``, the last by ``[IMG_END]`` (the processor's layout); its features
go to the ``[IMG]`` rows only, the other two keep their token embeddings::

    prompt     [INST] [IMG] [IMG] [IMG_BREAK] [IMG] [IMG] [IMG_END] What ...
    span              |<------------- rows * (cols + 1) ----------->|
    features          f0    f1    -           f2    f3    -          (rows x cols = 2 x 2)

``encode_images`` gives the whole span (zeros at the break and end columns) so the runner's
encoder cache, chunked prefill and prefix cache see one contiguous run per image;
``ImageTextModel.forward`` writes only the rows whose token is ``[IMG]``
(``sparse_image_rows``). HF's ``Mistral3Model`` (``masked_scatter`` over ``[IMG]``) and vLLM's
``mistral3.py`` compute the same.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.nn as nn

from tessellm.layers.context import ModelContext
from tessellm.models.clip import activation
from tessellm.models.image_embeds import ImageTextModel
from tessellm.models.llava import _LANGUAGE_MODELS, image_token_id
from tessellm.models.ministral3 import Ministral3ForCausalLM
from tessellm.models.pixtral_vision import PixtralVisionTower, unused_pixtral_weight
from tessellm.models.qwen2_vl_vision import VisionRMSNorm


def merge_size(config) -> int:
    """Patches merged a side into one ``[IMG]``: Mistral 3's ``spatial_merge_size``; 1 for
    Pixtral 12B (LLaVA's config has none)."""
    return int(getattr(config, "spatial_merge_size", None) or 1)


def span_length(rows: int, cols: int) -> int:
    """Tokens of an image's placeholder: each row's ``[IMG]`` and its break (the last row's end)."""
    return rows * (cols + 1)


# text config model_type -> Mistral 3's language model (LLaVA's and Ministral 3's)
LANGUAGE_MODELS = {**_LANGUAGE_MODELS, "ministral3": Ministral3ForCausalLM}


class PatchMerger(nn.Module):
    """Each ``m x m`` block of an image's patch states, concatenated channel-major (as
    ``F.unfold`` lays them out: ``[c0 at (0,0), c0 at (0,1), ..., c1 at (0,0), ...]``) -> one
    linear layer back to the tower's width. Blocks come row by row."""

    def __init__(self, dim: int, merge: int):
        super().__init__()
        self.merge = merge
        self.merging_layer = nn.Linear(dim * merge * merge, dim, bias=False)

    def forward(self, x: torch.Tensor, grids) -> torch.Tensor:
        m, d = self.merge, x.shape[-1]
        out = []
        for part, (h, w) in zip(x.split([h * w for h, w in grids]), grids):
            blocks = part.view(h // m, m, w // m, m, d).permute(0, 2, 4, 1, 3)
            out.append(blocks.reshape(-1, d * m * m))
        return self.merging_layer(torch.cat(out))


class Mistral3Projector(nn.Module):
    """RMSNorm -> patch merger -> linear_1 -> act -> linear_2 (HF's module names)."""

    def __init__(self, config, feature_width: int):
        super().__init__()
        text, vision = config.text_config, config.vision_config
        bias = bool(getattr(config, "multimodal_projector_bias", False))
        self.norm = VisionRMSNorm(vision.hidden_size, eps=text.rms_norm_eps)
        self.patch_merger = PatchMerger(vision.hidden_size, int(config.spatial_merge_size))
        self.linear_1 = nn.Linear(feature_width, text.hidden_size, bias=bias)
        self.act = activation(getattr(config, "projector_hidden_act", "gelu"))
        self.linear_2 = nn.Linear(text.hidden_size, text.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, grids) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.patch_merger(self.norm(x), grids))))


class Mistral3ForConditionalGeneration(ImageTextModel):
    """``forward``, ``compute_logits``, ``attention_layers``: ``ImageTextModel``'s."""

    sparse_image_rows = True  # an image's span holds [IMG_BREAK] / [IMG_END] rows too

    def __init__(self, config, ctx: ModelContext):
        super().__init__()
        self.config = config
        text, vision = _text_config(config), config.vision_config
        if getattr(vision, "model_type", "pixtral") != "pixtral":
            raise ValueError(f"Mistral 3 with a {vision.model_type!r} vision tower is not "
                             "supported; tessellm runs its Pixtral tower.")
        lm_class = LANGUAGE_MODELS.get(getattr(text, "model_type", "mistral"))
        if lm_class is None:
            raise ValueError(f"Mistral 3 with a {text.model_type!r} language model is not "
                             f"supported; supported: {', '.join(sorted(LANGUAGE_MODELS))}.")
        self.image_token_id = image_token_id(config)
        self.merge = merge_size(config)
        self.tower_here = ctx.pp.is_first  # pipeline: the tower on the first stage only
        if self.tower_here:
            self.vision_tower = PixtralVisionTower(vision, getattr(config, "vision_feature_layer", -1))
            width = vision.hidden_size * len(self.vision_tower.feature_layers)
            self.multi_modal_projector = self.make_projector(config, text, width)
        self.language_model = lm_class(text, ctx)

    def make_projector(self, config, text, width: int) -> nn.Module:
        if width != config.vision_config.hidden_size:
            raise ValueError("Mistral 3 with several vision_feature_layer is not supported: its "
                             "projector norms the tower's width; give one layer.")
        return Mistral3Projector(config, width)

    def project(self, feats: torch.Tensor, grids) -> torch.Tensor:
        """The tower's patch states of images of ``grids`` (patches) -> one token per merged
        patch, image after image, row by row."""
        return self.multi_modal_projector(feats, grids)

    # -- what the runner calls -------------------------------------------------------------

    def encode_images(self, pixels: torch.Tensor, image_sizes) -> list[torch.Tensor]:
        """``[N, 3, H, W]`` preprocessed images and their (height, width) -> per image its
        span's rows ``[rows * (cols + 1), text hidden]`` (zeros at the break and end rows)."""
        merge = self.merge
        patch = self.vision_tower.patch_size
        grids = [(int(h) // patch, int(w) // patch) for h, w in image_sizes]
        feats = self.project(self.vision_tower(pixels, image_sizes), grids)
        out = []
        for part, (h, w) in zip(feats.split([h * w // merge ** 2 for h, w in grids]), grids):
            rows, cols = h // merge, w // merge
            span = part.new_zeros(rows, cols + 1, part.shape[-1])
            span[:, :cols] = part.view(rows, cols, -1)
            out.append(span.view(-1, part.shape[-1]))
        return out

    def dummy_images(self, num_tokens: int, device) -> tuple[torch.Tensor, list]:
        """Blank square images covering ``num_tokens`` placeholders (at most the tower's
        ``image_size`` a side), and their sizes, for the memory profile."""
        vision = self.config.vision_config
        unit = int(vision.patch_size) * self.merge
        side = max(1, min(int(vision.image_size) // unit, int(num_tokens ** 0.5)))
        n = max(1, -(-num_tokens // span_length(side, side)))
        pixels = torch.zeros(n, int(vision.num_channels), side * unit, side * unit, device=device)
        return pixels, [[side * unit, side * unit]] * n

    # -- weights ---------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF names, in either layout: the Mistral 3 checkpoints' (``vision_tower.*``,
        ``multi_modal_projector.*``, ``language_model.model.*``, ``language_model.lm_head.*``)
        or transformers 5's (``model.vision_tower.*``, ``model.multi_modal_projector.*``,
        ``model.language_model.*``, ``lm_head.*``)."""
        built = len(self.vision_tower.transformer.layers) if self.tower_here else 0
        return self.load_routed_weights(weights, lambda rest: unused_pixtral_weight(rest, built))


def _text_config(config):
    """The language model's config, with the top-level ``tie_word_embeddings`` on a copy where
    the text config has none."""
    text = config.text_config
    if getattr(text, "tie_word_embeddings", None) is None:
        text = copy.copy(text)
        text.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
    return text


class PixtralLlavaForConditionalGeneration(Mistral3ForConditionalGeneration):
    """Pixtral 12B (``LlavaForConditionalGeneration`` whose ``vision_config`` is Pixtral): the
    same tower, prompt layout and front end, one ``[IMG]`` per patch (no merger) and LLaVA's
    projector (linear_1 -> act -> linear_2, biases per ``multimodal_projector_bias``)."""

    def make_projector(self, config, text, width: int) -> nn.Module:
        from tessellm.models.llava import LlavaProjector, feature_select_strategy

        if feature_select_strategy(config) != "full":
            raise ValueError("LLaVA with a Pixtral tower needs vision_feature_select_strategy "
                             "'full' (Pixtral has no class token to drop).")
        return LlavaProjector(width, text.hidden_size, getattr(config, "projector_hidden_act", "gelu"),
                              bool(getattr(config, "multimodal_projector_bias", True)))

    def project(self, feats: torch.Tensor, grids) -> torch.Tensor:
        return self.multi_modal_projector(feats)
