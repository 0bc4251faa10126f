"""The Qwen2-VL and Qwen2.5-VL vision towers: a ViT over variable-resolution images.

The image processor resizes an image to a multiple of ``patch * merge`` pixels and flattens
it into ``t x h x w`` patches of ``3 x temporal_patch x patch x patch`` values
(``image_grid_thw``; an image has ``t = 1``), listed merge block by merge block::

    patch grid (h=4, w=6, merge 2)        patch order (the processor's, and the tower's)
    a a b b c c                           a a a a  b b b b  c c c c  d d d d  ...
    a a b b c c                           (each merge block's 2x2 patches together)
    d d e e f f
    d d e e f f

    patches [P, 3*2*p*p] -> patch embed -> blocks (attention within each image) -> merger:
    each block's m*m patch states concatenated -> MLP -> one token per block for the LLM

Each patch carries a 2-D rotary position (its row and column in the patch grid; half the
rotary frequencies turn with the row, half with the column). Attention is bidirectional
within one image (one frame), so the images of a batch go through the tower together, their
patches concatenated, with variable-length attention over per-image blocks
(``varlen_attention`` over ``VarlenBlocks``).

Qwen2.5-VL differs: RMSNorm and a SwiGLU MLP (with biases) in the blocks, an RMSNorm in the
merger, and window attention: the merge blocks are reordered window by window (windows of
``window_size`` pixels, ``window_size // merge // patch`` merge blocks a side) and every block
except ``fullatt_block_indexes`` attends only within its window; the merger's output is put
back in the original order. HF's ``Qwen2VisionTransformerPretrainedModel`` /
``Qwen2_5_VisionTransformerPretrainedModel`` and vLLM's ``qwen2_vl.py`` / ``qwen2_5_vl.py``
compute the same; the tower here is replicated on every tensor-parallel rank.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tessellm.models.clip import activation

Grid = Sequence[int]  # (t, h, w) in patches


def _act(name: str):
    return F.silu if name == "silu" else activation(name)


def patch_positions(grids: Sequence[Grid], merge: int) -> np.ndarray:
    """``[P, 2]`` (row, column) of every patch, in the processor's merge-block order."""
    out = []
    for t, h, w in grids:
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        blocks = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)
        cols = cols.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([rows, cols], axis=-1), (t, 1)))
    return np.concatenate(out)


def frame_seqlens(grids: Sequence[Grid]) -> list[int]:
    """Cumulative patch counts of the attention blocks: one per frame of each image."""
    bounds = [0]
    for t, h, w in grids:
        for _ in range(t):
            bounds.append(bounds[-1] + h * w)
    return bounds


def window_order(grids: Sequence[Grid], merge: int, window: int) -> tuple[np.ndarray, list[int]]:
    """Qwen2.5-VL's windows: (the merge blocks in window order, as indices into the merge
    blocks of all images; the cumulative patch counts of the windows). ``window``: merge blocks
    a window side. Windows at the right and bottom edges are partial::

        merge blocks (5 x 6), window 2:   0 0 1 1 2 2      order: window 0's blocks row by
                                          0 0 1 1 2 2      row, then window 1's, ...
                                          3 3 4 4 5 5
                                          3 3 4 4 5 5
                                          6 6 7 7 8 8      (a window of 2 blocks)
    """
    order, bounds, first = [], [0], 0
    unit = merge * merge
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        index = np.arange(t * gh * gw).reshape(t, gh, gw)
        for frame in index:
            for r in range(0, gh, window):
                for c in range(0, gw, window):
                    cell = frame[r:r + window, c:c + window].reshape(-1)
                    order.append(cell + first)
                    bounds.append(bounds[-1] + cell.size * unit)
        first += t * gh * gw
    return np.concatenate(order), bounds


class VarlenBlocks:
    """The attention blocks ``[cu_seqlens[i], cu_seqlens[i+1])`` of one tower forward, grouped
    by length once (row indices on the device) and used by every layer: blocks of equal length
    run as one batched SDPA call (images of one size, a tower's equal windows), so a batch of
    many windows costs a few calls a layer, not one each, and no host work per layer."""

    def __init__(self, cu_seqlens: Sequence[int], device):
        bounds = np.asarray(cu_seqlens, dtype=np.int64)
        lengths = np.diff(bounds)
        total = int(bounds[-1])
        self.groups = []  # (block length, blocks, their rows: a slice when they are all rows)
        for length in np.unique(lengths[lengths > 0]).tolist():
            starts = bounds[:-1][lengths == length]
            if len(starts) * length == total:
                rows = slice(None)
            else:
                rows = torch.from_numpy((starts[:, None] + np.arange(length)).reshape(-1)).to(device)
            self.groups.append((length, len(starts), rows))


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     blocks: VarlenBlocks) -> torch.Tensor:
    """Bidirectional attention within each of ``blocks``; ``q``, ``k``, ``v``: ``[N, heads,
    head]``."""
    out = torch.empty_like(q)
    for length, n, rows in blocks.groups:
        def split(x):
            return x[rows].view(n, length, *x.shape[1:]).transpose(1, 2)

        o = F.scaled_dot_product_attention(split(q), split(k), split(v))
        out[rows] = o.transpose(1, 2).reshape(n * length, *q.shape[1:])
    return out


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX rotation in float32 (as HF's ``apply_rotary_pos_emb_vision``)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class VisionRotary(nn.Module):
    """2-D rotary: ``head/4`` frequencies turned by the row for the first quarter of the head
    and ``head/4`` by the column for the second; the halves repeat (NeoX). Qwen2-VL gives rows
    and columns the same ``theta^(-4j/head)``; Pixtral (``interleaved``) splits the ``head/2``
    frequencies ``theta^(-2k/head)``: the even ``k`` turn with the row, the odd with the column."""

    def __init__(self, head_size: int, theta: float = 10000.0, interleaved: bool = False):
        super().__init__()
        if interleaved:
            inv = 1.0 / (theta ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))
            freqs = torch.stack([inv[0::2], inv[1::2]])
        else:
            dim = head_size // 2
            inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
            freqs = torch.stack([inv, inv])
        self.register_buffer("inv_freq", freqs, persistent=False)  # [2 (row, column), head/4]

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N, 2]`` (row, column) -> cos, sin ``[N, 1, head]`` float32."""
        freqs = (positions.float()[..., None] * self.inv_freq.float()).flatten(1)  # [N, head/2]
        angles = torch.cat([freqs, freqs], dim=-1)[:, None, :]
        return angles.cos(), angles.sin()


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rotary: tuple, blocks: VarlenBlocks) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)
        q, k = _rotate(q, *rotary), _rotate(k, *rotary)
        return self.proj(varlen_attention(q, k, v, blocks).reshape(n, -1))


class VisionMLP(nn.Module):
    """Qwen2-VL: fc1 -> act -> fc2."""

    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = _act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionGatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``: Qwen2.5-VL's with biases, Pixtral's without."""

    def __init__(self, dim: int, hidden: int, act: str, bias: bool = True):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act = _act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionRMSNorm(nn.Module):
    """RMSNorm in float32, weight applied in the input dtype (HF's Qwen2RMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class VisionBlock(nn.Module):
    """Pre-norm: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp: nn.Module, norm):
        super().__init__()
        self.norm1 = norm(dim)
        self.norm2 = norm(dim)
        self.attn = VisionAttention(dim, num_heads)
        self.mlp = mlp

    def forward(self, x, rotary, blocks: VarlenBlocks):
        x = x + self.attn(self.norm1(x), rotary, blocks)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """The Conv3d whose kernel is the whole patch (stride = kernel): one matrix product over
    the flattened patches (its weight keeps the checkpoint's 5-D shape); Qwen3-VL's has a bias."""

    def __init__(self, in_channels: int, temporal: int, patch: int, dim: int, bias: bool = False):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=(temporal, patch, patch),
                              stride=(temporal, patch, patch), bias=bias)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        if patches.shape[-1] != weight[0].numel():
            raise ValueError(f"Image patches have {patches.shape[-1]} values; the vision tower "
                             f"takes {weight[0].numel()} (3 x temporal x patch x patch). Preprocess "
                             "with the model's image processor.")
        return F.linear(patches.to(weight.dtype), weight.view(weight.shape[0], -1), self.proj.bias)


class PatchMerger(nn.Module):
    """Each merge block's ``m*m`` patch states, normed and concatenated -> MLP -> LLM width."""

    def __init__(self, out_dim: int, dim: int, merge: int, norm):
        super().__init__()
        self.hidden = dim * merge * merge
        self.ln_q = norm(dim)
        self.mlp = nn.Sequential(nn.Linear(self.hidden, self.hidden), nn.GELU(),
                                 nn.Linear(self.hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.hidden))


class Qwen2VisionTower(nn.Module):
    """Qwen2-VL's tower (``vision_config``: embed_dim, hidden_size = the LLM's, mlp_ratio)."""

    def __init__(self, config):
        super().__init__()
        dim = config.embed_dim
        self.merge = config.spatial_merge_size
        self.patch_embed = PatchEmbed(config.in_channels, config.temporal_patch_size,
                                      config.patch_size, dim)
        self.rotary = VisionRotary(dim // config.num_heads, _vision_theta(config))

        def norm(d):
            return nn.LayerNorm(d, eps=1e-6)

        hidden = int(dim * config.mlp_ratio)
        self.blocks = nn.ModuleList(
            VisionBlock(dim, config.num_heads, VisionMLP(dim, hidden, config.hidden_act), norm)
            for _ in range(config.depth))
        self.merger = PatchMerger(config.hidden_size, dim, self.merge, norm)

    def forward(self, patches: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        """``[P, values]`` patches of the images whose grids are ``grids`` -> ``[P / m^2,
        LLM hidden]``: the images' tokens, image after image."""
        x = self.patch_embed(patches)
        rotary = self.rotary(torch.from_numpy(patch_positions(grids, self.merge)).to(x.device))
        images = VarlenBlocks(frame_seqlens(grids), x.device)
        for block in self.blocks:
            x = block(x, rotary, images)
        return self.merger(x)


class Qwen25VisionTower(nn.Module):
    """Qwen2.5-VL's tower (``vision_config``: hidden_size, intermediate_size, out_hidden_size,
    window_size, fullatt_block_indexes)."""

    def __init__(self, config):
        super().__init__()
        dim = config.hidden_size
        self.merge = config.spatial_merge_size
        self.window = config.window_size // self.merge // config.patch_size
        if self.window < 1:
            raise ValueError(f"vision_config.window_size {config.window_size} is smaller than one "
                             f"merge block ({self.merge * config.patch_size} pixels).")
        self.full_attention = set(config.fullatt_block_indexes)
        self.patch_embed = PatchEmbed(config.in_channels, config.temporal_patch_size,
                                      config.patch_size, dim)
        self.rotary = VisionRotary(dim // config.num_heads, _vision_theta(config))
        self.blocks = nn.ModuleList(
            VisionBlock(dim, config.num_heads,
                        VisionGatedMLP(dim, config.intermediate_size, config.hidden_act), VisionRMSNorm)
            for _ in range(config.depth))
        self.merger = PatchMerger(config.out_hidden_size, dim, self.merge, VisionRMSNorm)

    def forward(self, patches: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        x = self.patch_embed(patches)
        unit = self.merge * self.merge
        order, window_bounds = window_order(grids, self.merge, self.window)
        order_t = torch.from_numpy(order).to(x.device)

        def windowed(t):  # merge blocks in window order (each block's patches stay together)
            return t.reshape(-1, unit, *t.shape[1:])[order_t].reshape(t.shape)

        x = windowed(x)
        positions = torch.from_numpy(patch_positions(grids, self.merge)).to(x.device)
        rotary = tuple(windowed(r) for r in self.rotary(positions))
        images = VarlenBlocks(frame_seqlens(grids), x.device)
        windows = VarlenBlocks(window_bounds, x.device)
        for i, block in enumerate(self.blocks):
            x = block(x, rotary, images if i in self.full_attention else windows)
        out = self.merger(x)
        return out[torch.argsort(order_t)]


def _vision_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", 10000.0))


def vision_tower(config) -> nn.Module:
    """The tower of a ``vision_config`` (Qwen2.5-VL's has ``fullatt_block_indexes``)."""
    if getattr(config, "fullatt_block_indexes", None) is not None:
        return Qwen25VisionTower(config)
    return Qwen2VisionTower(config)
