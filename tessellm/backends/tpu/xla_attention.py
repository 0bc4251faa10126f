"""Paged attention for the tpu backend (torch-xla).

Two paths behind one ``AttentionKernel``:

- XLA path (any PJRT device, XLA's CPU device included): the padded pure-torch formulation of
  ``backends/reference/padded_attention.py`` with every metadata dimension rounded up to a power of
  two, so XLA compiles one program per bucket instead of one per batch shape. Writing the
  cache must not use slot -1 (XLA has no data-dependent shapes, so we cannot drop rows):
  padding rows are given the slot and the values of the batch's first real token, a duplicate
  write of identical values, which is deterministic.
- Pallas path (a real TPU, pure-decode batch, no sliding window): torch-xla's Pallas
  ``paged_attention(q, k_pages, v_pages, lengths, page_indices, pages_per_compute_block)``
  from ``torch_xla.experimental.custom_kernel``. Its pages are laid out
  ``[num_kv_heads, pages, page_size, head_size]``, so our cache is permuted per call (a copy
  XLA may or may not fuse away: measure before trusting it; a backend-chosen cache layout would
  remove it). Never run: no TPU here.
"""

from __future__ import annotations

import dataclasses

import torch

from tessellm.backends.reference.padded_attention import (PaddedMetadata, PaddedTorchAttentionKernel,
                                                   padded_attention)


def pow2_bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    n = max(int(n), minimum)
    return 1 << (n - 1).bit_length()


def pallas_paged_attention():
    """torch-xla's Pallas decode kernel when running on a real TPU, else None. Never raises."""
    try:
        import torch_xla.runtime as xr

        if xr.device_type() != "TPU":
            return None
        from torch_xla.experimental.custom_kernel import paged_attention
    except Exception:  # noqa: BLE001 - torch-xla absent or too old
        return None
    return paged_attention


class XlaPagedAttentionKernel(PaddedTorchAttentionKernel):
    name = "xla-padded"
    supports_graph_capture = False  # metadata values come from the host lists each step

    def __init__(self, spec, pallas=None):
        super().__init__(spec, bucket=pow2_bucket)
        self.pallas = pallas if spec.sliding_window is None else None
        if self.pallas is not None:
            self.name = "xla-pallas"

    @staticmethod
    def token_bucket(n: int) -> int:
        """The model runner pads each step's tokens and sampled rows to this (module doc)."""
        return pow2_bucket(n, 8)

    def build_metadata(self, batch) -> PaddedMetadata:
        # The block table is padded on the host: padding it on the device would put the
        # batch's exact shape into the XLA graph, one program per batch instead of per bucket.
        md = super().build_metadata(dataclasses.replace(batch, block_tables=batch.block_tables.cpu()))
        md.block_tables = md.block_tables.to(batch.slot_mapping.device)
        return md

    def write_cache(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        valid = slot_mapping >= 0
        first = torch.argmax(valid.to(torch.int32))  # first real token (static shape)
        slots = torch.where(valid, slot_mapping, slot_mapping[first])
        keep = valid[:, None, None]
        kvh, d = k_cache.shape[2], k_cache.shape[3]
        k_cache.view(-1, kvh, d).index_copy_(0, slots, torch.where(keep, k, k[first]).to(k_cache.dtype))
        v_cache.view(-1, kvh, d).index_copy_(0, slots, torch.where(keep, v, v[first]).to(v_cache.dtype))

    def forward(self, q, k, v, k_cache, v_cache, metadata: PaddedMetadata, scale: float):
        self.write_cache(k, v, k_cache, v_cache, metadata.slot_mapping)
        if self.pallas is not None and metadata.is_pure_decode:
            return self._pallas_decode(q, k_cache, v_cache, metadata, scale)
        return padded_attention(q, k_cache, v_cache, metadata, scale, self.window)

    def _pallas_decode(self, q, k_cache, v_cache, md: PaddedMetadata, scale: float):
        # Decode: one query per sequence, rows 0..S-1 of the grid (padding sequences: length 0).
        qs = q[md.q_rows[:, 0]] * scale  # [S, H, D]; the kernel does not scale
        k_pages = k_cache.permute(2, 0, 1, 3)  # [KVH, blocks, block_size, D]
        v_pages = v_cache.permute(2, 0, 1, 3)
        pages_per_block = min(16, md.block_tables.shape[1])
        out = self.pallas(qs, k_pages, v_pages, md.seq_lens.to(torch.int32),
                          md.block_tables.to(torch.int32), pages_per_block)
        return out[md.tok_seq].to(q.dtype)
