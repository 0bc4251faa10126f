"""The CLIP vision tower (ViT) as LLaVA uses it: the hidden states of one (or several) of its
encoder layers, never its pooled output.

    pixels [B, 3, H, W] -> patch conv (stride = patch) -> [CLS] + patches + positions
        -> pre_layrnorm -> layer 0 .. layer k-1   (k: as far as the selected layer needs)
    hidden_states[i] is the output after i layers (0: the pre-LN'd embeddings), as HF counts
    them, so ``vision_feature_layer=-2`` is the output of the second to last layer.

Attention is bidirectional over one image's tokens (every image of a batch has the same size),
so it is a plain scaled-dot-product attention: no KV cache, no paging. The tower is small and
replicated on every tensor-parallel rank.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTS = {"quick_gelu": _quick_gelu, "gelu": F.gelu,
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def activation(name: str):
    if name not in _ACTS:
        raise ValueError(f"Activation {name!r} is not supported in the vision tower; "
                         f"supported: {', '.join(sorted(_ACTS))}.")
    return _ACTS[name]


class CLIPEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden, patch = config.hidden_size, config.patch_size
        self.patch_size = patch
        self.image_size = config.image_size
        self.class_embedding = nn.Parameter(torch.empty(hidden))
        self.patch_embedding = nn.Conv2d(config.num_channels, hidden, kernel_size=patch,
                                         stride=patch, bias=False)
        self.num_patches = (config.image_size // patch) ** 2
        self.position_embedding = nn.Embedding(self.num_patches + 1, hidden)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if tuple(pixels.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"The vision tower takes {self.image_size}x{self.image_size} images; "
                             f"got {tuple(pixels.shape[-2:])}. Preprocess with the model's "
                             "image processor (it resizes and crops).")
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)  # [B, patches, hidden]
        cls = self.class_embedding.expand(pixels.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def heads(y):
            return y.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)),
                                             heads(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))


class CLIPMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, config):
        super().__init__()
        eps = config.layer_norm_eps
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(num_layers))


class CLIPVisionTower(nn.Module):
    """Builds only the layers the selected feature layers need (``feature_layers``: HF
    indices into hidden_states, negative from the end); ``forward`` returns their hidden
    states, concatenated along the hidden dimension when there are several."""

    def __init__(self, config, feature_layers: Sequence[int]):
        super().__init__()
        total = config.num_hidden_layers
        self.feature_layers = [i if i >= 0 else total + 1 + i for i in feature_layers]
        if not all(0 <= i <= total for i in self.feature_layers):
            raise ValueError(f"vision_feature_layer {list(feature_layers)} is outside the vision "
                             f"tower's {total} layers.")
        self.embeddings = CLIPEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config, max(self.feature_layers))

    @property
    def num_positions(self) -> int:
        """Tokens per image: the class token and the patches."""
        return self.embeddings.num_patches + 1

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.pre_layrnorm(self.embeddings(pixels))
        kept = {0: x} if 0 in self.feature_layers else {}  # only the selected layers' outputs
        for i, layer in enumerate(self.encoder.layers, start=1):
            x = layer(x)
            if i in self.feature_layers:
                kept[i] = x
        return torch.cat([kept[i] for i in self.feature_layers], dim=-1)
