"""Pixtral's vision encoder (HF ``PixtralVisionModel``, the tower of Mistral 3 / Mistral Small
3.1): a ViT over images of their own size, no resize to a square and no learned positions.

    image [3, H, W] (H, W multiples of the patch; the processor resizes within its longest
    edge) -> patch conv -> [H/p * W/p, D] patches, row by row -> RMSNorm (ln_pre) -> layers

Each layer is pre-norm (RMSNorm) attention then a SwiGLU MLP, no biases. A patch's rotary
position is its (row, column): half the head's frequencies turn with the row, half with the
column (``VisionRotary(interleaved=True)``). The images of one call attend each within itself:
their patches are concatenated and attention runs over per-image blocks (``varlen_attention``,
as the Qwen2-VL towers do), so images of different sizes share a forward.

``feature_layers``: which hidden states the caller takes (HF's ``vision_feature_layer``:
0 is ln_pre's output, ``i`` the output of layer ``i``, negative counts from the last), their
concatenation along the hidden axis; layers past the last one taken are not built.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from tessellm.models.qwen2_vl_vision import (VarlenBlocks, VisionGatedMLP, VisionRMSNorm,
                                             VisionRotary, _rotate, varlen_attention)


class PixtralAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, rotary: tuple, blocks: VarlenBlocks) -> torch.Tensor:
        n = x.shape[0]

        def heads(y):
            return y.view(n, self.num_heads, -1)

        q = _rotate(heads(self.q_proj(x)), *rotary)
        k = _rotate(heads(self.k_proj(x)), *rotary)
        return self.o_proj(varlen_attention(q, k, heads(self.v_proj(x)), blocks).reshape(n, -1))


class PixtralLayer(nn.Module):
    """``x + attention(attention_norm(x))``, then ``x + feed_forward(ffn_norm(x))`` (HF names)."""

    def __init__(self, config):
        super().__init__()
        dim = config.hidden_size
        self.attention_norm = VisionRMSNorm(dim, eps=1e-5)
        self.attention = PixtralAttention(dim, config.num_attention_heads)
        self.ffn_norm = VisionRMSNorm(dim, eps=1e-5)
        self.feed_forward = VisionGatedMLP(dim, config.intermediate_size, config.hidden_act, bias=False)

    def forward(self, x, rotary, blocks: VarlenBlocks):
        x = x + self.attention(self.attention_norm(x), rotary, blocks)
        return x + self.feed_forward(self.ffn_norm(x))


class PixtralTransformer(nn.Module):
    def __init__(self, config, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(PixtralLayer(config) for _ in range(num_layers))


def feature_layer_indexes(layers, num_layers: int) -> list[int]:
    """HF's ``vision_feature_layer`` (an index or a list) as hidden-state indexes in
    ``0..num_layers``."""
    layers = [layers] if isinstance(layers, int) else list(layers)
    out = []
    for i in layers:
        if not -(num_layers + 1) <= i <= num_layers:
            raise ValueError(f"vision_feature_layer {i} is outside the tower's {num_layers} layers.")
        out.append(i % (num_layers + 1))
    return out


class PixtralVisionTower(nn.Module):
    def __init__(self, config, feature_layers):
        super().__init__()
        if config.rope_parameters.get("rope_type", "axial") != "axial":
            raise ValueError(f"Pixtral with rope_type {config.rope_parameters['rope_type']!r} is "
                             "not supported; its tower turns axial 2-D rotary.")
        dim, heads = config.hidden_size, config.num_attention_heads
        self.patch_size = int(config.patch_size)
        self.feature_layers = feature_layer_indexes(feature_layers, config.num_hidden_layers)
        self.patch_conv = nn.Conv2d(config.num_channels, dim, kernel_size=self.patch_size,
                                    stride=self.patch_size, bias=False)
        self.ln_pre = VisionRMSNorm(dim, eps=1e-5)
        self.rotary = VisionRotary(dim // heads, float(config.rope_parameters["rope_theta"]),
                                   interleaved=True)
        self.transformer = PixtralTransformer(config, max(self.feature_layers))

    def forward(self, pixels: torch.Tensor, sizes: Sequence[Sequence[int]]) -> torch.Tensor:
        """``[N, 3, H, W]`` images (image ``i`` in the top-left ``sizes[i]`` = (height, width)
        pixels, the rest padding) -> ``[sum of h*w patches, D * len(feature_layers)]``, image
        after image, each row by row."""
        p = self.patch_size
        grids = [(int(h) // p, int(w) // p) for h, w in sizes]
        if pixels.shape[1] != self.patch_conv.in_channels or any(
                h * p > pixels.shape[-2] or w * p > pixels.shape[-1] for h, w in grids):
            raise ValueError(f"Images of shape {tuple(pixels.shape)} do not hold the sizes {sizes}; "
                             "preprocess them with the model's image processor.")
        embeds = self.patch_conv(pixels.to(self.patch_conv.weight.dtype))
        x = torch.cat([e[:, :h, :w].flatten(1).T for e, (h, w) in zip(embeds, grids)])
        x = self.ln_pre(x)
        positions = np.concatenate([np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"),
                                             axis=-1).reshape(-1, 2) for h, w in grids])
        rotary = self.rotary(torch.from_numpy(positions).to(x.device))
        blocks = VarlenBlocks(np.cumsum([0] + [h * w for h, w in grids]).tolist(), x.device)
        states = [x]
        for layer in self.transformer.layers:
            x = layer(x, rotary, blocks)
            states.append(x)
        return torch.cat([states[i] for i in self.feature_layers], dim=-1)


def unused_pixtral_weight(rest: str, built_layers: int) -> bool:
    """A tower weight past the last layer whose states are taken (not built)."""
    if rest.startswith("transformer.layers."):
        return int(rest.split(".")[2]) >= built_layers
    return False

