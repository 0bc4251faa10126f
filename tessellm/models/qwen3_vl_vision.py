"""Qwen3-VL's vision tower: Qwen2-VL's variable-resolution ViT (patches in merge-block order,
2-D rotary, attention within each image: ``qwen2_vl_vision.py``) with

* a patch embedding with a bias, plus a learned square table of absolute positions
  (``pos_embed``, ``side x side`` entries) resampled to each image's patch grid bilinearly
  with aligned corners (HF's ``get_vision_interpolation_indices_and_weights``)::

      patch (row r, col c) of an h x w grid reads the table at
      (r * (side-1) / (h-1), c * (side-1) / (w-1)): 4 taps, weights (1-dy)(1-dx) ...

* LayerNorm blocks with a GELU (tanh) MLP (``linear_fc1`` / ``linear_fc2``), full attention
  in every block (no windows);
* DeepStack: after each block of ``deepstack_visual_indexes`` a merger of its own (LayerNorm
  over the concatenated ``m*m`` patch states) gives features that the language model adds to
  its hidden states at the image tokens after its first layers (``qwen3_vl.py``).

``forward`` returns, per merged token, the final merger's features and then each DeepStack
merger's, concatenated along the hidden axis (``[tokens, (1 + k) * LLM hidden]``), so the
runner's encoder cache keeps and slices them as one tensor. HF's
``Qwen3VLVisionModel`` and vLLM's ``qwen3_vl.py`` compute the same.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from tessellm.models.qwen2_vl_vision import (Grid, PatchEmbed, VarlenBlocks, VisionBlock,
                                             VisionRotary, _act, _vision_theta, frame_seqlens,
                                             patch_positions)


class Qwen3VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.linear_fc1 = nn.Linear(dim, hidden)
        self.linear_fc2 = nn.Linear(hidden, dim)
        self.act = _act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class Qwen3PatchMerger(nn.Module):
    """Each merge block's ``m*m`` patch states concatenated -> LayerNorm (over one patch's
    state, or, ``postshuffle``, over the concatenation: the DeepStack mergers) -> fc1, GELU,
    fc2 -> LLM width."""

    def __init__(self, dim: int, merge: int, out_dim: int, postshuffle: bool):
        super().__init__()
        self.hidden = dim * merge * merge
        self.postshuffle = postshuffle
        self.norm = nn.LayerNorm(self.hidden if postshuffle else dim, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.hidden, self.hidden)
        self.act = nn.GELU()
        self.linear_fc2 = nn.Linear(self.hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.view(-1, self.hidden)) if self.postshuffle else self.norm(x).view(-1, self.hidden)
        return self.linear_fc2(self.act(self.linear_fc1(x)))


def _axis_taps(index: torch.Tensor, size: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear taps (``[N, 2]`` table rows) and weights along one axis, aligned corners."""
    src = index.float() * (side - 1) / torch.clamp(size - 1, min=1)
    floor = torch.floor(src)
    offsets = torch.arange(2)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    weights = (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
    return taps, weights


def position_taps(positions: np.ndarray, grids: Sequence[Grid], side: int):
    """``[P, 4]`` rows of the ``side x side`` position table and their weights, for patches at
    ``positions`` (row, column) of images of ``grids``."""
    counts = [t * h * w for t, h, w in grids]
    heights = torch.from_numpy(np.repeat([h for _, h, _ in grids], counts))
    widths = torch.from_numpy(np.repeat([w for _, _, w in grids], counts))
    pos = torch.from_numpy(positions)
    rows, row_w = _axis_taps(pos[:, 0], heights, side)
    cols, col_w = _axis_taps(pos[:, 1], widths, side)
    taps = (rows[:, :, None] * side + cols[:, None, :]).reshape(-1, 4)
    return taps, (row_w[:, :, None] * col_w[:, None, :]).reshape(-1, 4)


class Qwen3VisionTower(nn.Module):
    """``vision_config``: hidden_size, intermediate_size, num_heads, depth, out_hidden_size,
    num_position_embeddings, deepstack_visual_indexes, hidden_act."""

    def __init__(self, config):
        super().__init__()
        dim = config.hidden_size
        self.merge = config.spatial_merge_size
        self.patch_embed = PatchEmbed(config.in_channels, config.temporal_patch_size,
                                      config.patch_size, dim, bias=True)
        self.pos_embed = nn.Embedding(config.num_position_embeddings, dim)
        self.side = int(config.num_position_embeddings ** 0.5)
        if self.side * self.side != config.num_position_embeddings:
            raise ValueError(f"vision_config.num_position_embeddings {config.num_position_embeddings} "
                             "is not a square; Qwen3-VL's position table is side x side.")
        self.rotary = VisionRotary(dim // config.num_heads, _vision_theta(config))

        def norm(d):
            return nn.LayerNorm(d, eps=1e-6)

        self.blocks = nn.ModuleList(
            VisionBlock(dim, config.num_heads,
                        Qwen3VisionMLP(dim, config.intermediate_size, config.hidden_act), norm)
            for _ in range(config.depth))
        self.merger = Qwen3PatchMerger(dim, self.merge, config.out_hidden_size, postshuffle=False)
        self.deepstack_indexes = [int(i) for i in config.deepstack_visual_indexes]
        if any(not 0 <= i < config.depth for i in self.deepstack_indexes):
            raise ValueError(f"deepstack_visual_indexes {self.deepstack_indexes} name blocks "
                             f"outside the tower's {config.depth}.")
        self.deepstack_merger_list = nn.ModuleList(
            Qwen3PatchMerger(dim, self.merge, config.out_hidden_size, postshuffle=True)
            for _ in self.deepstack_indexes)

    def forward(self, patches: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        """``[P, values]`` patches of the images of ``grids`` -> ``[P / m^2, (1 + k) * LLM
        hidden]``: the merger's features, then each DeepStack merger's."""
        x = self.patch_embed(patches)
        positions = patch_positions(grids, self.merge)
        taps, weights = position_taps(positions, grids, self.side)
        table = self.pos_embed(taps.to(x.device)) * weights.to(x.device)[:, :, None]
        x = x + table.sum(1).to(x.dtype)
        rotary = self.rotary(torch.from_numpy(positions).to(x.device))
        images = VarlenBlocks(frame_seqlens(grids), x.device)
        deep = []
        for i, block in enumerate(self.blocks):
            x = block(x, rotary, images)
            if i in self.deepstack_indexes:
                deep.append(self.deepstack_merger_list[self.deepstack_indexes.index(i)](x))
        return torch.cat([self.merger(x), *deep], dim=-1)
