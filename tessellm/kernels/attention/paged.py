"""``TritonAttentionKernel``: the contract's ``AttentionKernel`` protocol on this package's
kernels (metadata type, builder, forward). It satisfies the protocol structurally and imports
nothing of the contract; the cuda and rocm backends serve it (rocm through a subclass).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from tessellm.kernels.attention.cache import reshape_and_cache, rotary_and_cache
from tessellm.kernels.attention.common import _is_fp8, _p2
from tessellm import envs
from tessellm.kernels.attention.decode import (decode_attention, decode_counters_numel,
                                               decode_workspace_numel)
from tessellm.kernels.attention.decode_table import lookup
from tessellm.kernels.attention.prefill import prefill_attention


@dataclass
class TritonAttentionMetadata:
    """What ``TritonAttentionKernel.forward`` needs for one step. Tensors are on the device."""

    num_decodes: int  # the first num_decodes sequences: query_len queries each, split-KV kernel
    num_prefills: int  # the rest: varlen prefill kernel
    num_splits: int  # decode splits per (sequence, KV head); a function of num_decodes only
    max_query_len: int  # bounds the prefill grid
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]
    seq_lens: torch.Tensor  # int32 [num_seqs]
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq]
    slot_mapping: torch.Tensor  # int64 [num_tokens]; -1 = skip
    # Queries per split-KV sequence: 1 (decodes), or q for a verify step (``verify_query_len``).
    query_len: int = 1
    # int32 [num_tokens]: the last key each row sees (``AttentionBatch.key_limits``), read by
    # the prefill kernel only; None: causal.
    key_limits: Optional[torch.Tensor] = None


class TritonAttentionKernel:
    """Paged attention through this module's Triton kernels (``AttentionKernel`` protocol).

    The split-KV workspace is allocated on the first decode forward, sized for
    ``max_num_seqs`` decodes, and reused by every layer; a larger batch grows it (outside graph
    capture: run each captured size eagerly once first, as graph runners do for warm-up).
    """

    name = "triton"
    supports_sliding_window = True
    supports_logit_softcap = True  # a constexpr branch of the kernels: no cost without a cap
    supports_attention_sinks = True  # likewise (forward's ``sinks``; ``common._join_sinks``)
    supports_key_limits = True  # likewise (the prefill kernel's KEY_LIMITS)
    supports_graph_capture = True  # no host sync in forward; grid fixed per batch size
    kv_cache_dtypes = ("auto", "fp8", "fp8_e4m3")  # fp8: e4m3 cache, needs sm89+ (Ada, Hopper)
    # forward takes positions/cos_sin_cache and applies NeoX rotary as it writes the cache
    # (``rotary_and_cache``): one launch per layer instead of two.
    fuses_rotary = True
    # Eager steps' block tables are padded to a multiple of 16 columns (ModelRunner): Triton
    # specialises an int argument that is 1 or a multiple of 16, so a table as wide as each
    # step's longest sequence gave the kernels' ``stride_bt`` three classes, and a mixed step
    # of a first real batch (its decodes' tables 33 blocks wide, say) compiled variants the
    # graphs' captures (whole-width tables) and the warm-up had not met (benchmarks/firstrun.py).
    table_width_multiple = 16
    min_partition = 128  # fewest keys a decode split handles (bounds partial-output traffic)
    target_programs = 1024  # decode programs wanted to fill the GPU (about 8 per SM on H100)
    max_splits = 32
    # Captured verify steps (speculative decoding: every sequence q = 2.. query tokens over its
    # cached context) take the split-KV kernel while its tile (q x GQA group rows, both rounded
    # up to powers of two) has at most this many rows; else the prefill kernel (``verify_query_len``).
    max_verify_rows = 64
    # One decode split writes the output itself (no reduce launch, ``decode_attention``);
    # False: always the separate reduce kernel (set on an instance for tests and benchmarks).
    fused_reduce = True
    # Latency-bound small decode batches (batch 1: ~11 us of attention a layer against 0.7 us
    # of K/V reads, H200): up to this many decodes the split kernel prefetches its first K/V
    # tile before the PDL wait (``decode_attention``'s prefetch), and up to
    # ``fuse_rotary_max_decodes`` a pure-decode step with a 16-bit cache does the rotary and
    # cache write in the split kernel too (one launch less a layer). 0 turns either off.
    prefetch_max_decodes = 16
    fuse_rotary_max_decodes = 16
    # At those batch sizes: splits of at least one 64-key tile, at most 16 splits (H200, B1
    # chain of Llama-8B at 768 keys: 3.948 ms a token against 4.078 with 32 splits of >= 128
    # keys; results/h200-2026-12-04-b1)
    small_batch_min_partition = 64
    small_batch_max_splits = 16
    # Up to this many plain decodes (no sinks) the last split of each (sequence, KV head) to
    # finish combines the partials (``decode_attention``'s counters): no reduce launch, one
    # launch less a layer at batch 1. 0: off, the default until timed on a GPU
    # (``benchmarks/b1fp8_device.sh``); TESSELLM_ATTN_LAST_REDUCE=1 sets it to
    # ``prefetch_max_decodes``, =0 to 0.
    last_reduce_max_decodes = 0

    def __init_subclass__(cls, **kwargs):
        # A subclass serves an fp8 cache only if it says so: its forward must pass k_scale and
        # v_scale on (and its hardware may want another fp8 format, e.g. e4m3fnuz on MI300).
        # Likewise a subclass with its own forward fuses rotary, or soft-caps, only if it says so.
        super().__init_subclass__(**kwargs)
        if "kv_cache_dtypes" not in cls.__dict__:
            cls.kv_cache_dtypes = ("auto",)
        if "forward" in cls.__dict__ and "fuses_rotary" not in cls.__dict__:
            cls.fuses_rotary = False
        if "forward" in cls.__dict__ and "supports_logit_softcap" not in cls.__dict__:
            cls.supports_logit_softcap = False  # its forward must pass logit_softcap on
        if "forward" in cls.__dict__ and "supports_attention_sinks" not in cls.__dict__:
            cls.supports_attention_sinks = False  # its forward must pass sinks on
        if "forward" in cls.__dict__ and "supports_key_limits" not in cls.__dict__:
            cls.supports_key_limits = False  # its forward must pass key_limits on

    def __init__(self, spec, max_model_len: int, max_num_seqs: int = 256):
        head_size = spec.head_size
        if head_size < 16 or head_size & (head_size - 1):
            raise ValueError(f"Triton attention needs a power-of-two head size >= 16, got "
                             f"{head_size}; use the reference kernel for this model.")
        if spec.num_heads % spec.num_kv_heads:
            raise ValueError(f"num_heads {spec.num_heads} is not a multiple of num_kv_heads "
                             f"{spec.num_kv_heads}.")
        if spec.kv_cache_dtype not in self.kv_cache_dtypes:
            raise ValueError(f"Triton attention supports kv_cache_dtype "
                             f"{', '.join(self.kv_cache_dtypes)}; got {spec.kv_cache_dtype!r}.")
        # The dtype the engine allocates the cache in (None: the model's dtype).
        self.kv_cache_torch_dtype = (torch.float8_e4m3fn if spec.kv_cache_dtype != "auto"
                                     else None)
        # Per-tensor fp8 scales (cache holds k / k_scale, v / v_scale): 1.0 unless a checkpoint
        # or calibration sets them. One pair for every layer (the kernel is shared).
        self.k_scale = 1.0
        self.v_scale = 1.0
        self.fp8_convert = "auto"  # how fp8 tiles are widened (``_fp8_ptx``); tests, benchmarks
        self.spec = spec
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.sliding_window = spec.sliding_window
        self.logit_softcap = getattr(spec, "logit_softcap", None)
        # ``decode_table``'s kind of this cache (an fp8 cache: as widened on CUDA sm89+)
        self._cache_kind = ("fp8" if spec.kv_cache_dtype != "auto"
                            else str(spec.dtype).removeprefix("torch."))
        self._splits_cap = max(1, min(self.max_splits, _p2(math.ceil(max_model_len
                                                                     / self.min_partition))))
        self._workspace: Optional[torch.Tensor] = None
        self._counters: Optional[torch.Tensor] = None
        last = envs.attn_last_split_reduce()
        if last is not None:
            self.last_reduce_max_decodes = self.prefetch_max_decodes if last else 0

    def num_splits(self, num_decodes: int) -> int:
        """Decode splits for a batch of ``num_decodes``: enough programs to fill the GPU."""
        programs = max(1, num_decodes * self.spec.num_kv_heads)
        want = _p2(math.ceil(self.target_programs / programs))
        if num_decodes <= self.prefetch_max_decodes:
            want = min(want, self.small_batch_max_splits)
        entry = lookup(self._cache_kind, num_decodes)
        if entry is not None and entry[4]:  # measured (``decode_table``)
            want = entry[4]
        return max(1, min(want, self._splits_cap))

    def workspace_numel(self, num_decodes: int, query_len: int = 1) -> int:
        return decode_workspace_numel(num_decodes, self.spec.num_heads,
                                      self.num_splits(num_decodes), self.spec.head_size, query_len)

    def _max_verify_query_len(self) -> int:
        return max(1, self.max_verify_rows // _p2(self.spec.num_heads // self.spec.num_kv_heads))

    def verify_query_len(self, batch) -> int:
        """q when ``batch`` is a graph-captured step in which every sequence has the same q >= 2
        query tokens, few enough for the split-KV kernel (the speculative verify graphs); else
        0. From host ints only: q tokens per sequence exactly when num_tokens = num_seqs * q;
        a captured step has empty host lists (``AttentionBatch``). Eager steps keep the prefill
        kernel: every split variant is then compiled while the graphs are captured, none after
        ready (a prefix-cache hit leaving a few tokens would otherwise meet a new one)."""
        q = batch.max_query_len
        if (batch.num_decodes or q < 2 or q > self._max_verify_query_len() or batch.seq_lens_host
                or batch.num_tokens != batch.num_seqs * q or batch.num_tokens > self.max_num_seqs):
            return 0
        return q

    def build_metadata(self, batch) -> TritonAttentionMetadata:
        q = self.verify_query_len(batch)
        if q:  # a captured verify step: every sequence through the split-KV kernel, q queries each
            return TritonAttentionMetadata(
                num_decodes=batch.num_seqs, num_prefills=0, num_splits=self.num_splits(batch.num_seqs),
                max_query_len=q, query_start_loc=batch.query_start_loc, seq_lens=batch.seq_lens,
                block_tables=batch.block_tables, slot_mapping=batch.slot_mapping, query_len=q)
        return TritonAttentionMetadata(
            num_decodes=batch.num_decodes, num_prefills=batch.num_seqs - batch.num_decodes,
            num_splits=self.num_splits(batch.num_decodes), max_query_len=batch.max_query_len,
            query_start_loc=batch.query_start_loc, seq_lens=batch.seq_lens,
            block_tables=batch.block_tables, slot_mapping=batch.slot_mapping,
            key_limits=getattr(batch, "key_limits", None))

    def _get_workspace(self, num_decodes: int, device, query_len: int = 1) -> torch.Tensor:
        need = self.workspace_numel(num_decodes, query_len)
        ws = self._workspace
        if ws is None or ws.numel() < need or ws.device != device:
            # Sized once for every decode and verify batch (``verify_query_len``), so graphs
            # captured earlier never hold a workspace that a later batch replaced.
            cap = max(self.workspace_numel(n, q) for q in range(1, self._max_verify_query_len() + 1)
                      for n in range(1, self.max_num_seqs // q + 1))
            self._workspace = ws = torch.empty(max(need, cap), dtype=torch.float32,
                                               device=device)
        return ws

    def _get_counters(self, num_decodes: int, device) -> Optional[torch.Tensor]:
        """The last-split reduce's counters (zeros, left zero by every launch), or None where
        ``last_reduce_max_decodes`` does not cover ``num_decodes``. Allocated once, for that
        many decodes, on the first (eager) forward that wants them."""
        if not 0 < num_decodes <= self.last_reduce_max_decodes or not self.fused_reduce:
            return None
        need = decode_counters_numel(self.last_reduce_max_decodes, self.spec.num_kv_heads)
        ctr = self._counters
        if ctr is None or ctr.numel() < need or ctr.device != device:
            self._counters = ctr = torch.zeros(need, dtype=torch.int32, device=device)
        return ctr

    def _decode_buffers(self, num_decodes: int, device, query_len: int = 1) -> dict:
        """``decode_attention``'s workspace and reduce mode."""
        return dict(workspace=self._get_workspace(num_decodes, device, query_len),
                    fused_reduce=self.fused_reduce,
                    counters=(self._get_counters(num_decodes, device) if query_len == 1
                              else None))

    def _fuses_decode_rotary(self, q, k_cache, md, cos_sin_cache) -> bool:
        """A pure-decode step of at most ``fuse_rotary_max_decodes`` on a 16-bit cache: the
        split kernel rotates and writes the new keys itself (``decode_attention``'s rotary)."""
        return (md.num_prefills == 0 and md.query_len == 1
                and 0 < md.num_decodes <= self.fuse_rotary_max_decodes
                and q.shape[0] == md.num_decodes and not _is_fp8(k_cache)
                and cos_sin_cache.shape[-1] == q.shape[-1])

    def forward(self, q, k, v, k_cache, v_cache, metadata: TritonAttentionMetadata, scale: float,
                out: Optional[torch.Tensor] = None, *, positions: Optional[torch.Tensor] = None,
                cos_sin_cache: Optional[torch.Tensor] = None,
                sinks: Optional[torch.Tensor] = None):
        """``AttentionKernel.forward``; with ``positions`` and ``cos_sin_cache`` (``fuses_rotary``)
        q and k arrive unrotated: q is NeoX-rotated in place, k as it is written to the cache.
        ``sinks``: float ``[H]`` attention sinks (a spec with ``attention_sinks``)."""
        md = metadata
        small = 0 < md.num_decodes <= self.prefetch_max_decodes
        rotary = None
        if positions is None:
            reshape_and_cache(k, v, k_cache, v_cache, md.slot_mapping, self.k_scale,
                              self.v_scale)
        elif self._fuses_decode_rotary(q, k_cache, md, cos_sin_cache):
            rotary = (k, v, md.slot_mapping, positions, cos_sin_cache)
        else:
            rotary_and_cache(q, k, v, k_cache, v_cache, md.slot_mapping, positions,
                             cos_sin_cache, self.k_scale, self.v_scale)
        if out is None:
            out = torch.empty_like(q)
        if md.num_decodes:
            decode_attention(q, k_cache, v_cache, out, md.query_start_loc, md.seq_lens,
                             md.block_tables, scale, num_seqs=md.num_decodes,
                             num_splits=md.num_splits, sliding_window=self.sliding_window,
                             min_partition=(self.small_batch_min_partition if small
                                            else self.min_partition),
                             k_scale=self.k_scale, v_scale=self.v_scale,
                             fp8_convert=self.fp8_convert, query_len=md.query_len,
                             prefetch=small, rotary=rotary, logit_softcap=self.logit_softcap,
                             sinks=sinks,
                             **self._decode_buffers(md.num_decodes, q.device, md.query_len))
        if md.num_prefills:
            prefill_attention(q, k_cache, v_cache, out, md.query_start_loc, md.seq_lens,
                              md.block_tables, scale, seq_offset=md.num_decodes,
                              num_seqs=md.num_prefills, max_query_len=md.max_query_len,
                              sliding_window=self.sliding_window, k_scale=self.k_scale,
                              v_scale=self.v_scale, fp8_convert=self.fp8_convert,
                              logit_softcap=self.logit_softcap, sinks=sinks,
                              key_limits=md.key_limits)
        return out
