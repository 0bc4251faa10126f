"""Paged attention through intel-extension-for-pytorch's PagedAttention ops.

``ipex.llm.modules.PagedAttention.flash_attn_varlen_func`` runs varlen causal attention of flat
queries over the paged caches through the block table, for decodes and (chunked) prefills
alike (the calls vLLM's XPU and CPU backends make). IPEX dispatches on the tensors' device:

- ``xpu`` tensors: caches in tessellm's layout ``[blocks, block_size, kv_heads, head]`` (IPEX's
  "flash" layout), written by ``reshape_and_cache_flash``. Never run here: no Intel GPU.
- ``cpu`` tensors (``LLM(device="xpu", emulate=True)``, the xpu lane): IPEX's CPU kernels want
  ``[blocks, kv_heads, block_size, head]`` contiguous, written by ``reshape_and_cache``. The
  kernel declares ``kv_cache_heads_major`` so the model runner allocates that storage and hands
  it over as a ``transpose(1, 2)`` view in tessellm's shape: no copy. A cache in tessellm's own
  contiguous layout (the conformance suite allocates its own) is written with index ops and
  copied heads-major for the call: correct, slower. Ran for real in the xpu lane (IPEX 2.8.0
  CPU build, torch 2.8.0): the conformance suite and greedy parity with the cpu backend.
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
    needed = ("flash_attn_varlen_func", "reshape_and_cache_flash", "reshape_and_cache")
    return ops if all(hasattr(ops, n) for n in needed) else None


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
    kv_cache_heads_major = True  # honoured on cpu tensors; see the module docstring

    def __init__(self, spec, ops):
        if spec.kv_cache_dtype != "auto":
            raise NotImplementedError("IPEX attention here supports kv_cache_dtype='auto' only.")
        if spec.num_heads % spec.num_kv_heads:
            raise ValueError(f"num_heads {spec.num_heads} is not a multiple of num_kv_heads "
                             f"{spec.num_kv_heads}.")
        self.spec = spec
        self.ops = ops
        w = spec.sliding_window
        self.window = (w - 1, 0) if w is not None else (-1, -1)

    def build_metadata(self, batch) -> IpexMetadata:
        cu_k = torch.zeros(batch.num_seqs + 1, dtype=torch.int32, device=batch.seq_lens.device)
        torch.cumsum(batch.seq_lens, dim=0, out=cu_k[1:])
        return IpexMetadata(batch.query_start_loc.int(), cu_k, batch.block_tables.int(),
                            batch.slot_mapping.long(), batch.max_query_len, batch.max_seq_len)

    def forward(self, q, k, v, k_cache, v_cache, metadata: IpexMetadata, scale: float):
        md = metadata
        if q.device.type == "cpu":
            kc, vc = self._write_cpu(k, v, k_cache, v_cache, md.slot_mapping)
        else:
            self.ops.reshape_and_cache_flash(k, v, k_cache, v_cache, md.slot_mapping)
            kc, vc = k_cache, v_cache
        out = torch.empty_like(q)
        self.ops.flash_attn_varlen_func(
            out, q.contiguous(), kc, vc, md.query_start_loc, md.cu_seqlens_k,
            md.max_query_len, md.max_seq_len, scale, True, md.block_tables, None,
            window_size_left=self.window[0], window_size_right=self.window[1])
        return out

    def _write_cpu(self, k, v, k_cache, v_cache, slots):
        """Write k/v; return the caches heads-major and contiguous, as IPEX's CPU ops read them."""
        kc, vc = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
        if kc.is_contiguous() and vc.is_contiguous():  # allocated heads-major: zero copy
            self.ops.reshape_and_cache(k, v, kc, vc, slots)
            return kc, vc
        keep = slots >= 0
        kvh, d = k_cache.shape[2], k_cache.shape[3]
        k_cache.view(-1, kvh, d).index_copy_(0, slots[keep], k[keep].to(k_cache.dtype))
        v_cache.view(-1, kvh, d).index_copy_(0, slots[keep], v[keep].to(v_cache.dtype))
        return kc.contiguous(), vc.contiguous()
