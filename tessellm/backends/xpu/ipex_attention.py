"""Paged attention through intel-extension-for-pytorch's PagedAttention ops.

``ipex.llm.modules.PagedAttention.reshape_and_cache_flash`` writes k/v into caches laid out
``[num_blocks, block_size, num_kv_heads, head_size]`` (tessellm's layout, IPEX's "flash"
layout), and ``flash_attn_varlen_func`` runs varlen causal attention of flat queries over them
through the block table, for decodes and (chunked) prefills alike. These are the calls vLLM's
XPU backend makes. Never run here: no Intel GPU, and the IPEX wheels pin another torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def ipex_paged_attention_ops():
    """The IPEX PagedAttention class when importable and new enough, else None. Never raises."""
    try:
        import intel_extension_for_pytorch as ipex  # noqa: F401

        ops = ipex.llm.modules.PagedAttention
    except Exception:  # noqa: BLE001 - absent, or a build whose import fails
        return None
    if hasattr(ops, "flash_attn_varlen_func") and hasattr(ops, "reshape_and_cache_flash"):
        return ops
    return None


@dataclass
class IpexMetadata:
    query_start_loc: torch.Tensor  # int32 [S + 1]
    cu_seqlens_k: torch.Tensor  # int32 [S + 1]: cumulative seq_lens
    block_tables: torch.Tensor  # int32 [S, max_blocks]
    slot_mapping: torch.Tensor  # int64 [T]
    max_query_len: int
    max_seq_len: int


class IpexAttentionKernel:
    name = "ipex-flash-varlen"
    supports_sliding_window = True
    supports_graph_capture = False

    def __init__(self, spec, ops):
        if spec.kv_cache_dtype != "auto":
            raise NotImplementedError("IPEX attention here supports kv_cache_dtype='auto' only.")
        self.spec = spec
        self.ops = ops
        w = spec.sliding_window
        self.window = (w - 1, 0) if w is not None else (-1, -1)

    def build_metadata(self, batch) -> IpexMetadata:
        cu_k = torch.zeros(batch.num_seqs + 1, dtype=torch.int32, device=batch.seq_lens.device)
        torch.cumsum(batch.seq_lens, dim=0, out=cu_k[1:])
        return IpexMetadata(batch.query_start_loc, cu_k, batch.block_tables, batch.slot_mapping,
                            batch.max_query_len, batch.max_seq_len)

    def forward(self, q, k, v, k_cache, v_cache, metadata: IpexMetadata, scale: float):
        md = metadata
        self.ops.reshape_and_cache_flash(k, v, k_cache, v_cache, md.slot_mapping)
        out = torch.empty_like(q)
        self.ops.flash_attn_varlen_func(
            out, q.contiguous(), k_cache, v_cache, md.query_start_loc, md.cu_seqlens_k,
            md.max_query_len, md.max_seq_len, scale, True, md.block_tables, None,
            window_size_left=self.window[0], window_size_right=self.window[1])
        return out
