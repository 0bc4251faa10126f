"""Paged attention for AMD GPUs: the cuda backend's Triton kernels with AMD tile choices.

The kernels in ``tessellm.kernels.attention`` are portable Triton; what differs on AMD
Instinct (CDNA) parts is the machine they are tiled for:

- a wavefront is 64 lanes (``num_warps`` counts wavefronts), so a 4-wave program already holds
  256 lanes: we use fewer, wider waves than on NVIDIA;
- Triton's AMD backend pipelines through registers rather than async copies, so
  ``num_stages`` above 2 only costs LDS (64 KiB per CU on MI300): we use 1 for prefill and 2
  for decode;
- MI300X has 304 CUs (MI250X: 220 per GCD pair): the split-KV decode aims at about 4 programs
  per CU.

These are the choices vLLM's ROCm Triton path makes for the same kernels' shapes; they have
NOT been measured here (no AMD GPU): the numbers are starting points for the first lane run on
real hardware, which should sweep them with ``benchmarks/kernels/bench_attention.py``.
"""

from __future__ import annotations

import torch

from tessellm.kernels.attention import (TritonAttentionKernel, decode_attention,
                                        prefill_attention, reshape_and_cache)


def amd_prefill_tiles(dtype, head_size: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the varlen prefill kernel on CDNA."""
    if dtype == torch.float32:
        return (32, 32, 4, 1) if head_size <= 128 else (16, 32, 4, 1)
    return (64, 64, 4, 1) if head_size <= 128 else (64, 32, 4, 1)


def amd_decode_tiles(dtype, head_size: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for the split-KV decode kernel on CDNA."""
    if dtype == torch.float32:
        return (32, 2, 2) if head_size <= 128 else (16, 2, 2)
    return (64, 2, 2) if head_size <= 128 else (32, 4, 2)


class RocmTritonAttentionKernel(TritonAttentionKernel):
    """``TritonAttentionKernel`` launched with AMD tiles (``AttentionKernel`` protocol)."""

    name = "triton-rocm"
    supports_graph_capture = True  # no host sync in forward; num_splits fixed per batch size
    target_programs = 304 * 4  # about 4 decode programs per CU on MI300X
    min_partition = 256  # longer splits: fewer partial outputs through the smaller L2
    fuses_rotary = False  # forward below takes no rotary inputs (the model rotates first)
    supports_logit_softcap = True  # forward below passes logit_softcap on
    supports_attention_sinks = True  # and sinks
    supports_key_limits = True  # and key_limits

    def forward(self, q, k, v, k_cache, v_cache, metadata, scale: float, out=None, *,
                sinks=None):
        md = metadata
        reshape_and_cache(k, v, k_cache, v_cache, md.slot_mapping)
        if out is None:
            out = torch.empty_like(q)
        head_size = q.shape[-1]
        if md.num_decodes:
            decode_attention(q, k_cache, v_cache, out, md.query_start_loc, md.seq_lens,
                             md.block_tables, scale, num_seqs=md.num_decodes,
                             num_splits=md.num_splits,
                             sliding_window=self.sliding_window, min_partition=self.min_partition,
                             tiles=amd_decode_tiles(q.dtype, head_size), query_len=md.query_len,
                             logit_softcap=self.logit_softcap, sinks=sinks,
                             **self._decode_buffers(md.num_decodes, q.device, md.query_len))
        if md.num_prefills:
            prefill_attention(q, k_cache, v_cache, out, md.query_start_loc, md.seq_lens,
                              md.block_tables, scale, seq_offset=md.num_decodes,
                              num_seqs=md.num_prefills, max_query_len=md.max_query_len,
                              sliding_window=self.sliding_window,
                              tiles=amd_prefill_tiles(q.dtype, head_size),
                              logit_softcap=self.logit_softcap, sinks=sinks,
                              key_limits=md.key_limits)
        return out
