"""The Llama 4 vision model (HF ``Llama4VisionModel``, the tower of Scout and Maverick): a ViT
over fixed-size tiles (the image processor cuts an image into tiles, ``llama4_inputs.py``),
then pixel shuffle and an MLP (the "vision adapter")::

    tile [3, S, S] -> unfold into p x p patches -> linear (no bias)     [P = (S/p)^2, D]
        -> append the class embedding (last, not first) -> + positions  [P + 1, D]
        -> layernorm_pre -> layers -> layernorm_post -> drop the class token
        -> pixel shuffle (ratio r: each 1/r x 1/r block of patches one token,  [P r^2, D / r^2]
           its states concatenated)
        -> vision adapter: GELU(fc1) -> GELU(fc2)                       [P r^2, projector out]

Each layer is pre-LayerNorm attention (q, k, v, o with biases) then a GELU MLP (fc1, fc2 with
biases). Attention is bidirectional within one tile; q and k turn by a 2-D rotary position:
the head's complex pairs ``(x[2i], x[2i+1])`` are split in two halves, the first turns with
the patch's column + 1, the second with its row + 1 (the class token does not turn)::

    pair i < d/4:   angle (column + 1) * theta^(-4i / d)
    pair i >= d/4:  angle (row + 1)    * theta^(-4(i - d/4) / d)

The tower is small beside the language model and is replicated on every tensor-parallel
rank; vLLM's ``mllama4.py`` and HF compute the same.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tessellm.models.clip import CLIPMLP


def _int_size(config, name: str) -> int:
    value = getattr(config, name)
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"Llama 4 vision config {name}={list(value)!r} is not supported; "
                             "tiles and patches are square.")
        value = value[0]
    return int(value)


def check_vision_config(config) -> None:
    """Refuses a vision config whose shapes do not compose (one sentence naming the field)."""
    size, patch = _int_size(config, "image_size"), _int_size(config, "patch_size")
    ratio = float(config.pixel_shuffle_ratio)
    side = size // patch
    inv = round(1.0 / ratio)
    if size % patch or abs(inv * ratio - 1.0) > 1e-6 or side % inv:
        raise ValueError(f"Llama 4 vision config image_size={size}, patch_size={patch}, "
                         f"pixel_shuffle_ratio={ratio} is not supported: the tile must be whole "
                         "patches and the patch grid a multiple of 1 / pixel_shuffle_ratio.")
    if config.intermediate_size != config.hidden_size * inv * inv:
        raise ValueError(f"Llama 4 vision config intermediate_size={config.intermediate_size} "
                         f"must be hidden_size / pixel_shuffle_ratio^2 = "
                         f"{config.hidden_size * inv * inv} (the adapter's input after pixel "
                         "shuffle).")
    if config.projector_input_dim != config.projector_output_dim:
        raise ValueError(f"Llama 4 vision config projector_input_dim={config.projector_input_dim} "
                         f"must equal projector_output_dim={config.projector_output_dim} (the "
                         "adapter's fc1 output is its fc2 input).")
    act = getattr(config, "hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"Llama 4 vision hidden_act {act!r} is not supported; HF's tower runs "
                         "exact GELU.")


def tokens_per_tile(config) -> int:
    """Language-model tokens of one tile: its patches after pixel shuffle."""
    side = _int_size(config, "image_size") // _int_size(config, "patch_size")
    inv = round(1.0 / float(config.pixel_shuffle_ratio))
    return (side // inv) ** 2


def rotary_tables(config) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[P + 1, head_dim / 2]`` (float32) of the patches, row-major, then the class
    token (angle 0)."""
    side = _int_size(config, "image_size") // _int_size(config, "patch_size")
    head_dim = config.hidden_size // config.num_attention_heads
    params = getattr(config, "rope_parameters", None) or {}
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    quarter = head_dim // 4
    inv_freq = 1.0 / theta ** (torch.arange(0, 2 * quarter, 2).float() / (head_dim // 2))
    index = torch.arange(side * side)
    cols, rows = (index % side + 1).float(), (index // side + 1).float()
    angles = torch.cat([cols[:, None] * inv_freq, rows[:, None] * inv_freq], dim=-1)
    angles = torch.cat([angles, torch.zeros(1, angles.shape[1])])  # the class token
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [B, T, heads, d]`` turned pair by pair (pairs ``(x[2i], x[2i+1])``), in float32."""
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


class Llama4VisionAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.o_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q = _rotate(self.q_proj(x).view(shape), cos, sin)
        k = _rotate(self.k_proj(x).view(shape), cos, sin)
        v = self.v_proj(x).view(shape)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class Llama4VisionEncoderLayer(nn.Module):
    """``x + attn(ln(x))``, then ``x + mlp(ln(x))`` (LayerNorm eps 1e-5, as HF's default)."""

    def __init__(self, config):
        super().__init__()
        self.self_attn = Llama4VisionAttention(config)
        self.mlp = CLIPMLP(config)  # fc1, GELU, fc2, with biases: the same as CLIP's
        self.input_layernorm = nn.LayerNorm(config.hidden_size)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama4PatchEmbedding(nn.Module):
    """HF's ``Llama4UnfoldConvolution``: unfold the tile into p x p patches (values in
    channel, row, column order) and project them, no bias."""

    def __init__(self, config):
        super().__init__()
        self.patch_size = _int_size(config, "patch_size")
        self.linear = nn.Linear(config.num_channels * self.patch_size ** 2, config.hidden_size,
                                bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = F.unfold(pixels, kernel_size=self.patch_size, stride=self.patch_size)
        return self.linear(patches.transpose(1, 2))


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """``[B, P, C]`` (P a square grid of patches) -> ``[B, P * ratio^2, C / ratio^2]``, HF's
    order: within a row, columns are merged first (their channels side by side), then rows."""
    b, p, c = x.shape
    side = int(round(p ** 0.5))
    inv = round(1.0 / ratio)
    x = x.view(b, side, side // inv, c * inv)  # adjacent columns merged
    x = x.permute(0, 2, 1, 3).reshape(b, side // inv, side // inv, c * inv * inv)
    return x.permute(0, 2, 1, 3).reshape(b, -1, c * inv * inv)


class Llama4VisionAdapter(nn.Module):
    """Pixel shuffle, then ``GELU(fc2(GELU(fc1(x))))`` (no biases): HF's
    ``Llama4VisionPixelShuffleMLP``."""

    def __init__(self, config):
        super().__init__()
        self.ratio = float(config.pixel_shuffle_ratio)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(config.intermediate_size, config.projector_input_dim, bias=False)
        self.mlp.fc2 = nn.Linear(config.projector_output_dim, config.projector_output_dim,
                                 bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.mlp.fc1(pixel_shuffle(x, self.ratio)))
        return F.gelu(self.mlp.fc2(x))


class Llama4VisionModel(nn.Module):
    """``forward``: tiles ``[N, 3, S, S]`` -> ``[N, tokens_per_tile, projector_output_dim]``."""

    def __init__(self, config):
        super().__init__()
        check_vision_config(config)
        hidden = config.hidden_size
        self.image_size = _int_size(config, "image_size")
        self.num_channels = config.num_channels
        num_positions = (self.image_size // _int_size(config, "patch_size")) ** 2 + 1
        self.patch_embedding = Llama4PatchEmbedding(config)
        self.class_embedding = nn.Parameter(torch.empty(hidden))
        self.positional_embedding_vlm = nn.Parameter(torch.empty(num_positions, hidden))
        self.layernorm_pre = nn.LayerNorm(hidden)
        self.layernorm_post = nn.LayerNorm(hidden)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(Llama4VisionEncoderLayer(config)
                                          for _ in range(config.num_hidden_layers))
        self.vision_adapter = Llama4VisionAdapter(config)
        cos, sin = rotary_tables(config)
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if tuple(pixels.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"The Llama 4 vision model takes {self.image_size}x{self.image_size} "
                             f"tiles; got {tuple(pixels.shape[-2:])}. Preprocess with the model's "
                             "image processor (it tiles the image).")
        x = self.patch_embedding(pixels.to(self.patch_embedding.linear.weight.dtype))
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([x, cls], dim=1) + self.positional_embedding_vlm.to(x.dtype)
        x = self.layernorm_pre(x)
        for layer in self.model.layers:
            x = layer(x, self.rotary_cos, self.rotary_sin)
        x = self.layernorm_post(x)[:, :-1]
        return self.vision_adapter(x)
