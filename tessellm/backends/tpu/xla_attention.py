"""Paged attention for the tpu backend (torch-xla).

Two paths behind one ``AttentionKernel``; ``path()`` says which one this process runs:

- ``xla-ragged-paged`` (a real TPU): torch-xla's Pallas kernel
  ``torch_xla.experimental.custom_kernel.ragged_paged_attention(q, kv_pages, kv_lens,
  page_indices, cu_q_lens, num_seqs, sm_scale=, sliding_window=)`` over the whole mixed
  batch (prefill chunks and decodes, ragged). Its pages interleave K and V per head
  (``[pages, page_size, 2 * kv_heads, head]``, K at even heads), so our separate K and V caches
  are interleaved per call: a copy per layer and step that a backend-chosen cache layout would
  remove. Never run: no TPU here. Pallas kernels do not run on PJRT's CPU device.
- ``xla-padded`` (any other PJRT device, XLA's CPU device included): the padded pure-torch
  formulation of ``backends/reference/padded_attention.py``, every dimension a bucket that
  depends only on the step's padded token count, its sequence bucket and pure decode or not:
  S = ``seq_bucket(num_seqs)``, Q = 1 for a pure-decode step else the padded token count
  (capped at the table's width in tokens), MB = the block table's full width (the runner pads
  it to ``max_model_len``), so a serving run compiles one XLA program per (T, S, decode).
  Layers with a logit soft-cap (Gemma 2) take this path on a TPU too.

Writing the cache must not use slot -1 (XLA has no data-dependent shapes, so rows cannot be
dropped): padding rows get the slot and the values of the step's first real token, a duplicate
write of identical values, which is deterministic.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from tessellm.backends.reference.padded_attention import (PaddedMetadata, PaddedTorchAttentionKernel,
                                                          padded_attention)
from tessellm.backends.reference.padded_attention import pow2


def pow2_bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return pow2(n, minimum)


def ragged_paged_attention():
    """torch-xla's Pallas ragged paged attention when running on a real TPU, else None."""
    try:
        import torch_xla.runtime as xr

        if xr.device_type() != "TPU":
            return None
        from torch_xla.experimental.custom_kernel import ragged_paged_attention as kernel
    except Exception:  # noqa: BLE001 - torch-xla absent or too old
        return None
    return kernel


@dataclasses.dataclass
class XlaMetadata(PaddedMetadata):
    cu_q_lens: Optional[torch.Tensor] = None  # int32 [S + 1] (ragged kernel only)
    num_seqs: Optional[torch.Tensor] = None  # int32 [1] (ragged kernel only)


class XlaPagedAttentionKernel(PaddedTorchAttentionKernel):
    name = "xla-padded"
    supports_graph_capture = False  # the runner's bucketed steps are the tpu "graphs"

    def __init__(self, spec, ragged=None):
        super().__init__(spec, bucket=pow2_bucket)
        # A soft-capped layer takes the padded path: the Pallas kernel's cap has not been run;
        # likewise a layer with attention sinks or key limits (the Pallas kernel has neither).
        self.ragged = ragged if (self.softcap is None and not getattr(spec, "attention_sinks", False)
                                 and not getattr(spec, "prefill_key_limits", False)) else None
        if ragged is not None:
            self.name = "xla-ragged-paged"

    @staticmethod
    def token_bucket(n: int) -> int:
        """The model runner pads each step's tokens to this (core/shape_buckets.py)."""
        return pow2(n, 8)

    @staticmethod
    def seq_bucket(n: int) -> int:
        """... and its sequences and sampled rows to this."""
        return pow2(n)

    def grid(self, batch, num_seqs: int, max_query_len: int, max_blocks: int) -> tuple[int, int, int]:
        width = max(int(batch.block_tables.shape[1]), max_blocks)
        q = 1 if max_query_len == 1 else min(batch.num_tokens, width * self.spec.block_size)
        return self.seq_bucket(num_seqs), q, width

    def build_metadata(self, batch) -> XlaMetadata:
        # The block table is padded on the host: padding it on the device would put the
        # batch's exact shape into the XLA graph, one program per batch instead of per bucket.
        md = super().build_metadata(dataclasses.replace(batch, block_tables=batch.block_tables.cpu()))
        dev = batch.slot_mapping.device
        md = XlaMetadata(**{f.name: getattr(md, f.name) for f in dataclasses.fields(PaddedMetadata)})
        md.block_tables = md.block_tables.to(dev)
        if self.ragged is not None:
            starts = list(batch.query_start_loc_host)
            S = md.seq_lens.shape[0]
            cu = torch.tensor(starts + [starts[-1]] * (S + 1 - len(starts)), dtype=torch.int32)
            md.cu_q_lens = cu.to(dev)
            md.num_seqs = torch.tensor([batch.num_seqs], dtype=torch.int32).to(dev)
        return md

    def write_cache(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        valid = slot_mapping >= 0
        # The first real token, as a [1] index tensor: indexing with a 0-d tensor would read its
        # value on the host (a graph break and a device sync per layer).
        first = torch.argmax(valid.to(torch.int32)).view(1)
        slots = torch.where(valid, slot_mapping, slot_mapping.index_select(0, first))
        keep = valid[:, None, None]
        kvh, d = k_cache.shape[2], k_cache.shape[3]
        k_new = torch.where(keep, k, k.index_select(0, first)).to(k_cache.dtype)
        v_new = torch.where(keep, v, v.index_select(0, first)).to(v_cache.dtype)
        k_cache.view(-1, kvh, d).index_copy_(0, slots, k_new)
        v_cache.view(-1, kvh, d).index_copy_(0, slots, v_new)

    def forward(self, q, k, v, k_cache, v_cache, metadata: XlaMetadata, scale: float, *,
                sinks=None):
        self.write_cache(k, v, k_cache, v_cache, metadata.slot_mapping)
        if self.ragged is not None:
            return self._ragged(q, k_cache, v_cache, metadata, scale)
        return padded_attention(q, k_cache, v_cache, metadata, scale, self.window, self.softcap,
                                sinks)

    def _ragged(self, q, k_cache, v_cache, md: XlaMetadata, scale: float):
        blocks, bs, kvh, d = k_cache.shape
        kv_pages = torch.stack((k_cache, v_cache), dim=3).reshape(blocks, bs, 2 * kvh, d)
        return self.ragged(q, kv_pages, md.seq_lens.to(torch.int32), md.block_tables.to(torch.int32),
                           md.cu_q_lens, md.num_seqs, sm_scale=scale,
                           sliding_window=self.window).to(q.dtype)


def attention_path() -> str:
    """Which attention path this process's tpu kernel takes (the backend report says it)."""
    return "xla-ragged-paged (Pallas, TPU)" if ragged_paged_attention() else "xla-padded (pure XLA)"
