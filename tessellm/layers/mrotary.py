"""Multimodal rotary embedding (M-RoPE, Qwen2-VL / Qwen2.5-VL): each token has three positions
(temporal, height, width), and the rotary frequencies are cut into three sections
(``mrope_section``, summing to ``rotary_dim / 2``), each turned by one of the three::

    frequency index:   0 ........ s0-1 | s0 ...... s0+s1-1 | s0+s1 ...... R/2-1
    turned by:         temporal pos    | height pos        | width pos

    a text token:      t = h = w = p   (plain RoPE at p)
    an image token:    t = start, h = start + row, w = start + column   (rows and columns of
                       the merged patch grid; ``multimodal/mrope.py`` computes them)

Qwen3-VL interleaves the sections instead (``interleaved``): frequency ``j`` turns with the
height when ``j % 3 == 1`` and ``j < 3 * s1``, with the width when ``j % 3 == 2`` and
``j < 3 * s2``, else with the temporal position::

    frequency index:   0 1 2 3 4 5 ... 3*s1 ...
    turned by:         t h w t h w ... t t t ...   (HF's ``Qwen3VLTextRotaryEmbedding``)

So a step without image tokens (every decode step, text-only prompts) is plain RoPE at one
position per token: ``forward`` takes positions ``[T]`` then, through the backend's rotary op
and the kernels that fuse it, as any model. A step with image tokens passes ``[3, T]``; the
cos/sin row of each token is assembled from the three positions' rows, and the rotation
looks those rows up by token index (``kernel_inputs``; ``models/qwen2_vl.MRopeAttention``
hands them to a kernel that fuses rotary). vLLM's ``MRotaryEmbedding`` and HF's
``apply_multimodal_rotary_pos_emb`` compute the same rotation.
"""

from __future__ import annotations

from typing import Sequence

import torch

from tessellm.layers.rotary import RotaryEmbedding


class MRotaryEmbedding(RotaryEmbedding):
    def __init__(self, head_size: int, max_position: int, base: float, scaling, ops,
                 mrope_section: Sequence[int], rotary_dim=None, max_positions=None,
                 interleaved: bool = False):
        super().__init__(head_size, max_position, base, scaling, ops, rotary_dim=rotary_dim,
                         max_positions=max_positions)
        section = [int(s) for s in mrope_section]
        if len(section) != 3 or sum(section) != self.rotary_dim // 2:
            raise ValueError(f"mrope_section {list(mrope_section)} must be three sizes summing to "
                             f"half the rotary dimension ({self.rotary_dim // 2}); the config's "
                             "rope_parameters do not match its head size.")
        # which of (t, h, w) turns each frequency, for the cos half and the sin half alike
        if interleaved:
            j = torch.arange(self.rotary_dim // 2)
            axis = torch.zeros_like(j)
            axis[(j % 3 == 1) & (j < 3 * section[1])] = 1
            axis[(j % 3 == 2) & (j < 3 * section[2])] = 2
        else:
            axis = torch.repeat_interleave(torch.arange(3), torch.tensor(section))
        self.register_buffer("axis", torch.cat([axis, axis]).to(self.cos_sin_cache.device),
                             persistent=False)

    def per_token_cache(self, positions: torch.Tensor) -> torch.Tensor:
        """``[3, T]`` positions -> ``[T, rotary_dim]``: each token's cos/sin row, frequency
        ``j`` taken at the position of axis ``axis[j]``."""
        rows = self.cos_sin_cache[positions]  # [3, T, R]
        return rows.gather(0, self.axis.view(1, 1, -1).expand(1, rows.shape[1], -1)).squeeze(0)

    def kernel_inputs(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions, cos/sin table) for an attention kernel that fuses the rotation (it
        looks table rows up by position): ``[3, T]`` -> (token index, per-token rows)."""
        if positions.dim() == 1:
            return positions, self.cos_sin_cache
        table = self.per_token_cache(positions)
        return torch.arange(table.shape[0], device=table.device), table

    def forward(self, positions, q, k):
        pos, cache = self.kernel_inputs(positions)
        return self.ops.rotary_embedding(pos, q, k, cache, self.head_size)
