"""The SigLIP vision tower as Gemma 3 uses it: the last layer's hidden states after the
post-layernorm, never the attention-pooling head.

    pixels [B, 3, H, W] -> patch conv (stride = patch, with bias) -> patches + positions
        -> encoder layers (CLIP's: pre-LN attention and MLP, ``models/clip.py``)
        -> post_layernorm -> [B, patches, hidden]

Against CLIP (``clip.py``): no class token and no pre-layernorm, a post-layernorm instead,
positions for the patches only, a bias on the patch conv; the encoder layers are the same math
(layer_norm1 -> q/k/v/out_proj -> layer_norm2 -> fc1 -> act -> fc2, with biases), so they are
CLIP's modules. Attention is bidirectional over one image's tokens (every image of a batch has
the same size): no KV cache, replicated on every tensor-parallel rank.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tessellm.models.clip import CLIPEncoder


class SiglipEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden, patch = config.hidden_size, config.patch_size
        self.image_size = config.image_size
        self.patch_embedding = nn.Conv2d(config.num_channels, hidden, kernel_size=patch,
                                         stride=patch)
        self.num_patches = (config.image_size // patch) ** 2
        self.position_embedding = nn.Embedding(self.num_patches, hidden)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if tuple(pixels.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"The vision tower takes {self.image_size}x{self.image_size} images; "
                             f"got {tuple(pixels.shape[-2:])}. Preprocess with the model's "
                             "image processor (it resizes).")
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))
        return patches.flatten(2).transpose(1, 2) + self.position_embedding.weight


class SiglipVisionTower(nn.Module):
    """``forward``: ``[B, 3, H, W]`` -> the post-layernormed last hidden states
    ``[B, patches, hidden]`` (HF ``SiglipVisionModel(...).last_hidden_state``)."""

    def __init__(self, config):
        super().__init__()
        self.embeddings = SiglipEmbeddings(config)
        self.encoder = CLIPEncoder(config, config.num_hidden_layers)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


def unused_siglip_weight(name: str) -> bool:
    """Checkpoint tensors of the tower that Gemma 3 never runs: the attention-pooling head
    (``head.*``, absent when ``vision_use_head`` is false)."""
    return name.startswith("head.")
