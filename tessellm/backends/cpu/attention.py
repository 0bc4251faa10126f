"""Paged attention for the cpu backend.

Eager decode sequences (one query each, first in the batch) run the C kernel of
``csrc/paged_decode.c`` (``native.py`` builds it on first use) where it loads: it reads K/V in
place through the block tables, each row once for the query heads of its KV head, with an
online softmax in float32, parallel over (sequence, KV head). Without it (``TESSELLM_CPU_NATIVE=0``,
no C compiler, a cache dtype other than float32/bfloat16) and in captured steps, decodes
run as batched SDPAs over their gathered,
right-padded contexts: in eager steps sorted by length and cut into groups of at most
``DECODE_GROUP_TOKENS`` padded context tokens, so that a group pads little and its gathered K/V
is still in cache when SDPA reads it (workload C on 2 cores, 64 decodes of 100-500 tokens:
about 3x less attention time than one SDPA over the whole batch padded to its longest; the
gather and SDPA are memory-bound). The other sequences too when each has at most ``SHORT_QUERY``
queries (a speculative verify step's k+1, short prompts: ``ShortQueries``, queries padded to the
longest), else one SDPA per sequence. K/V are always read
through the block table: the cache is paged, never a contiguous per-request buffer.

Graph capture (``graph_runner.py`` compiles the decode step with ``torch.compile``): a captured
step gets no host lists (``seq_lens_host == []``), so a decode batch attends over the whole
width of the block table it is given, masked by ``seq_lens``; padding rows have slot -1 and
length 0. Nothing here reads a tensor's value on the host, so the step traces as one graph.

A captured **verify** step (speculative decoding, ``spec_decode/verify_graphs.py``) has no host
lists either and no decodes: every sequence has the same ``q = max_query_len`` query tokens at
the end of its context. It runs batched like a decode, one SDPA over the gathered contexts with
a ``[S, 1, q, L]`` mask (query i of sequence s sees keys ``<= seq_len - q + i``)::

    seq_len 7, q 3:   query 0 (pos 4)  k k k k k . .
                      query 1 (pos 5)  k k k k k k .
                      query 2 (pos 6)  k k k k k k k
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from tessellm.backends.cpu import native
from tessellm.backends.cpu.decode_step import decode_step, fusable
from tessellm.backends.cpu.sdpa import sdpa
from tessellm.backends.spec import AttentionSpec
from tessellm.backends.spec import AttentionBatch


# Padded context tokens of one eager decode group (K and V of 4096 tokens of SmolLM2: 6 MiB).
DECODE_GROUP_TOKENS = 4096


@dataclass
class DecodeGroup:
    rows: Optional[torch.Tensor]  # int64 decode rows of this group; None: rows 0..n-1 in order
    blocks: torch.Tensor  # int64 [n, blocks] block ids to gather
    # float [n, 1, 1, L]: 0 where key j is valid for the group's sequence s, else -inf. Additive,
    # built once a step: SDPA would turn a bool mask into this in every layer (measured: the
    # bool mask makes a decode group's SDPA ~1.4x slower on the CPU).
    mask: torch.Tensor


@dataclass
class CpuAttentionMetadata:
    batch: AttentionBatch
    decode_groups: list[DecodeGroup]  # the decode rows, in groups of similar context length
    prefill_masks: list[Optional[torch.Tensor]]  # per prefill seq: bool [Q, L] or None (causal)
    padded_slots: bool  # some slot may be -1: write the cache without dropping rows
    # A captured verify step (no host lists): every sequence has ``verify_q`` queries; 0: none.
    verify_q: int = 0
    verify_mask: Optional[torch.Tensor] = None  # bool [S, 1, q, L]
    verify_blocks: Optional[torch.Tensor] = None  # int64 [S, blocks]
    # An eager step whose non-decode sequences all have at most SHORT_QUERY queries (a verify
    # step's k+1, short prompts): one batched SDPA for them, their queries padded to ``short_q``.
    short: Optional["ShortQueries"] = None
    native_decode: Optional["NativeDecode"] = None  # the eager decodes, through the C kernel


@dataclass
class NativeDecode:
    """What ``tl_paged_decode`` reads for the first ``n`` (decode) sequences, int32 contiguous."""

    n: int
    tables: torch.Tensor  # int32 [n, blocks]
    seq_lens: torch.Tensor  # int32 [n]
    slots: Optional[torch.Tensor] = None  # int64 [n]: each decode's k/v slot (tl_decode_step)


# Non-decode sequences with at most this many queries each run batched (``ShortQueries``).
SHORT_QUERY = 16


@dataclass
class ShortQueries:
    """The non-decode sequences of an eager step, batched: ``n`` query rows each (a sequence
    with fewer repeats its last query; those rows are dropped after SDPA)::

        q lens 3, 1, 3 (n = 3):  rows  [0 1 2] [3 3 3] [4 5 6]   keep [0 1 2 3 6 7 8]
    """

    n: int
    mask: torch.Tensor  # bool [S', 1, n, L]: query i of sequence s sees key j
    blocks: torch.Tensor  # int64 [S', blocks]
    rows: Optional[torch.Tensor]  # int64 [S' * n]: token row per padded query; None: uniform
    keep: Optional[torch.Tensor]  # int64 [T']: the padded rows that are real; None: uniform


class CpuAttentionKernel:
    name = "cpu-sdpa"
    supports_sliding_window = True
    supports_logit_softcap = True  # the C decode kernel caps; the torch path through ``sdpa.py``
    # forward's ``sinks``: the C decode kernel joins them; the torch paths through ``sdpa.py``
    supports_attention_sinks = True
    # AttentionBatch.key_limits: in the prefill masks (decode rows never carry a limit)
    supports_key_limits = True
    supports_graph_capture = True  # no host syncs; decode metadata needs no host lists
    # forward takes the unrotated q, k with positions and the cos/sin cache: a step of float32
    # decodes runs rotary, cache write and attention in one C call (csrc/decode_step.c); any
    # other step rotates first (CpuOps.rotary_embedding: native or the reference) and goes on.
    fuses_rotary = True

    def __init_subclass__(cls, **kwargs):
        # A plugin subclass with its own forward fuses rotary only if it says so (as the Triton
        # kernel's, kernels/attention/paged.py): its forward may not take or pass the rotary
        # keyword arguments on; likewise the soft-cap.
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__ and "fuses_rotary" not in cls.__dict__:
            cls.fuses_rotary = False
        if "forward" in cls.__dict__ and "supports_logit_softcap" not in cls.__dict__:
            cls.supports_logit_softcap = False
        if "forward" in cls.__dict__ and "supports_attention_sinks" not in cls.__dict__:
            cls.supports_attention_sinks = False
        if "build_metadata" in cls.__dict__ and "supports_key_limits" not in cls.__dict__:
            cls.supports_key_limits = False

    def __init__(self, spec: AttentionSpec):
        from tessellm.backends.cpu.ops import CpuOps

        self.spec = spec
        self.window = spec.sliding_window
        self.softcap = spec.logit_softcap  # C decode kernel, else explicit SDPA (``sdpa.py``)
        self.native = native.load() if _native_shapes(spec) else None
        self.rope = CpuOps()

    def build_metadata(self, batch: AttentionBatch) -> CpuAttentionMetadata:
        if not batch.query_start_loc_host and batch.num_decodes == 0:
            return self._verify_metadata(batch)
        bs = self.spec.block_size
        nd = batch.num_decodes
        groups, native_decode = [], None
        if nd and batch.seq_lens_host and self.native is not None and not torch.compiler.is_compiling():
            native_decode = NativeDecode(nd, batch.block_tables[:nd].to(torch.int32).contiguous(),
                                         batch.seq_lens[:nd].to(torch.int32).contiguous(),
                                         batch.slot_mapping[:nd].to(torch.int64).contiguous())
        elif nd and batch.seq_lens_host:  # eager: groups of similar length, each its own width
            for rows, longest in _decode_groups(batch.seq_lens_host[:nd], bs):
                groups.append(self._decode_group(batch, rows, -(-longest // bs)))
        elif nd:  # a captured step: the table's width bounds every context
            groups.append(self._decode_group(batch, None, batch.block_tables.shape[1]))
        short = self._short_queries(batch)
        prefill_masks = []
        limits = getattr(batch, "key_limits", None)
        for s in _prefill_seqs(batch) if short is None else ():
            q0, q1 = batch.query_start_loc_host[s], batch.query_start_loc_host[s + 1]
            q_len, seq_len = q1 - q0, batch.seq_lens_host[s]
            if q_len == seq_len and self.window is None and limits is None:
                prefill_masks.append(None)
                continue
            q_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
            k_pos = torch.arange(seq_len)[None, :]
            mask = k_pos <= (q_pos if limits is None else limits[q0:q1].long()[:, None])
            if self.window is not None:
                mask &= k_pos > q_pos - self.window
            prefill_masks.append(mask)
        padded = (torch.compiler.is_compiling() or not batch.seq_lens_host
                  or bool((batch.slot_mapping < 0).any()))  # once per step, on the host
        return CpuAttentionMetadata(batch, groups, prefill_masks, padded, short=short,
                                    native_decode=native_decode)

    def _decode_group(self, batch: AttentionBatch, rows: Optional[list[int]], nblocks: int) -> DecodeGroup:
        nd = batch.num_decodes
        idx = None if rows is None else torch.tensor(rows, dtype=torch.int64)
        tables = batch.block_tables[:nd] if idx is None else batch.block_tables.index_select(0, idx)
        lens = (batch.seq_lens[:nd] if idx is None else batch.seq_lens.index_select(0, idx)).long()
        k_pos = torch.arange(nblocks * self.spec.block_size)
        q_pos = (lens - 1)[:, None]
        valid = k_pos[None, :] <= q_pos
        if self.window is not None:
            valid &= k_pos[None, :] > q_pos - self.window
        mask = torch.zeros(valid.shape, dtype=self.spec.dtype).masked_fill_(~valid, float("-inf"))
        return DecodeGroup(idx, tables[:, :nblocks].long(), mask[:, None, None, :])

    def _short_queries(self, batch: AttentionBatch) -> Optional[ShortQueries]:
        """``ShortQueries`` for an eager step's non-decode sequences, or None (none of them, or
        one with more than ``SHORT_QUERY`` queries: those run one SDPA each)."""
        seqs = _prefill_seqs(batch)
        if not len(seqs) or not batch.query_start_loc_host or torch.compiler.is_compiling():
            return None
        starts = batch.query_start_loc_host[seqs.start:]
        q_lens = [b - a for a, b in zip(starts, starts[1:])]
        n = max(q_lens)
        if n > SHORT_QUERY:
            return None
        seq_lens = batch.seq_lens_host[seqs.start:]
        bs = self.spec.block_size
        nblocks = -(-max(seq_lens) // bs)
        ql = torch.tensor(q_lens)
        i = torch.minimum(torch.arange(n)[None, :], (ql - 1)[:, None])  # [S', n]
        q_pos = (torch.tensor(seq_lens) - ql)[:, None] + i
        q_lim = q_pos  # the last key each query sees: its position, or its key limit
        if getattr(batch, "key_limits", None) is not None:
            q_lim = batch.key_limits.long()[torch.tensor(starts[:-1])[:, None] + i]
        k_pos = torch.arange(nblocks * bs)
        valid = k_pos[None, None, :] <= q_lim[:, :, None]
        if self.window is not None:
            valid &= k_pos[None, None, :] > q_pos[:, :, None] - self.window
        rows = keep = None
        if min(q_lens) != n:
            rows = (torch.tensor(starts[:-1]) - starts[0])[:, None] + i
            rows, keep = rows.reshape(-1), (torch.arange(n)[None, :] < ql[:, None]).reshape(-1).nonzero().squeeze(1)
        blocks = batch.block_tables[seqs.start:, :nblocks].long()
        return ShortQueries(n, valid[:, None], blocks, rows, keep)

    def _verify_metadata(self, batch: AttentionBatch) -> CpuAttentionMetadata:
        """A captured verify step: ``max_query_len`` queries per sequence (module docstring)."""
        q = batch.max_query_len
        blocks = batch.block_tables.long()
        k_pos = torch.arange(blocks.shape[1] * self.spec.block_size)
        q_pos = (batch.seq_lens.long() - q)[:, None] + torch.arange(q)[None, :]  # [S, q]
        valid = k_pos[None, None, :] <= q_pos[:, :, None]
        if self.window is not None:
            valid &= k_pos[None, None, :] > q_pos[:, :, None] - self.window
        return CpuAttentionMetadata(batch, [], [], True, q, valid[:, None], blocks)

    def forward(self, q, k, v, k_cache, v_cache, metadata: CpuAttentionMetadata, scale: float,
                positions=None, cos_sin_cache=None, *, sinks=None):
        """``sinks``: float32 ``[H]`` for a spec with ``attention_sinks``: joined by the C decode
        kernel, and by ``sdpa.py``'s explicit form on the torch paths."""
        batch = metadata.batch
        if sinks is not None:
            sinks = sinks.float().contiguous()
        if positions is not None:
            nat = metadata.native_decode
            if (nat is not None and nat.slots is not None and nat.n == q.shape[0]
                    and not metadata.padded_slots and fusable(q, k, v, positions, cos_sin_cache)):
                return decode_step(self.native, q, k, v, k_cache, v_cache, nat, positions,
                                   cos_sin_cache, scale, self.window, self.softcap, sinks)
            t, d = q.shape[0], q.shape[-1]
            q, k = self.rope.rotary_embedding(positions, q.view(t, -1), k.view(t, -1), cos_sin_cache, d)
            q, k = q.view(t, -1, d), k.view(t, -1, d)
        if metadata.padded_slots:
            _write_cache_padded(k, v, k_cache, v_cache, batch.slot_mapping)
        else:
            _write_cache(k, v, k_cache, v_cache, batch.slot_mapping)
        if metadata.verify_q:
            return self._verify(q, k_cache, v_cache, metadata, scale, sinks)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        nd = batch.num_decodes
        if metadata.native_decode is not None:
            self._native_decode(q[:nd], k_cache, v_cache, metadata.native_decode, scale, out[:nd],
                                sinks)
        for group in metadata.decode_groups:
            if group.rows is None:
                out[:nd] = self._decode(q[:nd], k_cache, v_cache, group, scale, sinks)
            else:
                o = self._decode(q.index_select(0, group.rows), k_cache, v_cache, group, scale,
                                 sinks)
                out.index_copy_(0, group.rows, o)
        if metadata.short is not None:
            out[batch.query_start_loc_host[nd]:] = self._short(q[batch.query_start_loc_host[nd]:], k_cache,
                                                               v_cache, metadata.short, scale, sinks)
            return out
        starts = batch.query_start_loc_host
        for i, s in enumerate(_prefill_seqs(batch)):
            q0, q1 = starts[s], starts[s + 1]
            out[q0:q1] = self._prefill(q[q0:q1], k_cache, v_cache, batch.block_tables[s],
                                       batch.seq_lens_host[s], metadata.prefill_masks[i], scale,
                                       sinks)
        return out

    def _decode(self, q, k_cache, v_cache, dg: DecodeGroup, scale, sinks=None):
        nd, num_heads, head_size = q.shape
        kvh = k_cache.shape[2]
        group = num_heads // kvh
        blocks = dg.blocks
        k = _gather(k_cache, blocks).view(nd, -1, kvh, head_size).transpose(1, 2)  # [B, KVH, L, D]
        v = _gather(v_cache, blocks).view(nd, -1, kvh, head_size).transpose(1, 2)
        qg = q.view(nd, kvh, group, head_size)  # the group's queries share a position
        o = sdpa(qg, k, v, attn_mask=dg.mask, scale=scale, logit_softcap=self.softcap,
                 sinks=None if sinks is None else sinks.view(kvh, group, 1))
        return o.reshape(nd, num_heads, head_size)

    def _native_decode(self, q, k_cache, v_cache, nat: NativeDecode, scale, out, sinks=None):
        """``out`` [n, H, D] (contiguous) = the decodes' attention, by the C kernel."""
        n, num_heads, head_size = q.shape
        if q.dtype != torch.float32 or q.stride(2) != 1 or q.stride(1) != head_size:
            q = q.to(torch.float32).contiguous()
        res = out if out.dtype == torch.float32 else torch.empty(out.shape, dtype=torch.float32)
        assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.dtype == v_cache.dtype
        rc = self.native.tl_paged_decode(
            q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
            int(k_cache.dtype == torch.bfloat16), nat.tables.data_ptr(), nat.tables.shape[1],
            nat.seq_lens.data_ptr(), n, num_heads, k_cache.shape[2], head_size, k_cache.shape[1],
            self.window or 0, scale, self.softcap or 0.0,
            None if sinks is None else sinks.data_ptr(), res.data_ptr(), torch.get_num_threads())
        if rc:
            raise RuntimeError(f"tl_paged_decode refused heads={num_heads} kv_heads={k_cache.shape[2]} "
                               f"head_size={head_size}")
        if res is not out:
            out.copy_(res)

    def _verify(self, q, k_cache, v_cache, md: CpuAttentionMetadata, scale, sinks=None):
        return _batched_queries(q, k_cache, v_cache, md.verify_blocks, md.verify_mask, md.verify_q, scale,
                                self.softcap, sinks)

    def _short(self, q, k_cache, v_cache, short: ShortQueries, scale, sinks=None):
        """The non-decode sequences' queries (``q`` from the first one on), one SDPA."""
        if short.rows is not None:
            q = q.index_select(0, short.rows)
        o = _batched_queries(q, k_cache, v_cache, short.blocks, short.mask, short.n, scale,
                             self.softcap, sinks)
        return o if short.keep is None else o.index_select(0, short.keep)

    def _prefill(self, q, k_cache, v_cache, block_table, seq_len, mask, scale, sinks=None):
        bs = k_cache.shape[1]
        nblocks = -(-seq_len // bs)
        ids = block_table[:nblocks].long()
        k = _gather(k_cache, ids).view(-1, *k_cache.shape[2:])[:seq_len].transpose(0, 1)  # [KVH, L, D]
        v = _gather(v_cache, ids).view(-1, *v_cache.shape[2:])[:seq_len].transpose(0, 1)
        # 4-D [KVH, G, Q, D] with K/V expanded over the group (a view): torch's CPU flash kernel
        # takes it, where 3-D inputs or enable_gqa=True run the math path (measured, one
        # thread, SmolLM2 heads: 146 causal tokens 4.2-5.7 -> 2.1-3.1 ms, 2,048: 1.8-2.1 -> 0.36-0.38 s).
        kvh, group = k.shape[0], q.shape[1] // k.shape[0]
        qh = q.transpose(0, 1).unflatten(0, (kvh, group))
        k, v = (t[:, None].expand(kvh, group, *t.shape[1:]) for t in (k, v))
        o = sdpa(qh, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                 logit_softcap=self.softcap,
                 sinks=None if sinks is None else sinks.view(kvh, group, 1, 1))
        return o.flatten(0, 1).transpose(0, 1)


def _batched_queries(q, k_cache, v_cache, blocks, mask, n: int, scale, logit_softcap=None,
                     sinks=None):
    """``q`` [S * n, H, D], n queries per sequence, against each sequence's gathered blocks;
    ``mask`` [S, 1, n, L]. The group's queries share a mask row."""
    num_heads, head_size = q.shape[1], q.shape[2]
    kvh = k_cache.shape[2]
    group = num_heads // kvh
    s = blocks.shape[0]
    k = _gather(k_cache, blocks).view(s, -1, kvh, head_size).transpose(1, 2)  # [S, KVH, L, D]
    v = _gather(v_cache, blocks).view(s, -1, kvh, head_size).transpose(1, 2)
    # [S, n, KVH, G, D] -> [S, KVH, G * n, D]: rows g * n + i, each group row i sees mask row i
    qg = q.view(s, n, kvh, group, head_size).permute(0, 2, 3, 1, 4).reshape(s, kvh, group * n, head_size)
    mask = mask.expand(s, group, n, mask.shape[-1]).reshape(s, 1, group * n, -1)
    if sinks is not None:  # row g * n + i: head kvh * G + g's sink
        sinks = sinks.view(kvh, group, 1).expand(kvh, group, n).reshape(kvh, group * n, 1)
    o = sdpa(qg, k, v, attn_mask=mask, scale=scale, logit_softcap=logit_softcap,
             sinks=sinks)  # [S, KVH, G * n, D]
    return o.view(s, kvh, group, n, head_size).permute(0, 3, 1, 2, 4).reshape(s * n, num_heads, head_size)


def _native_shapes(spec: AttentionSpec) -> bool:
    """Whether the C decode kernel handles this layer (it loads only then)."""
    return (spec.kv_cache_dtype == "auto" and spec.dtype in (torch.float32, torch.bfloat16)
            and spec.num_heads % spec.num_kv_heads == 0 and spec.num_heads <= 128
            and spec.head_size <= 256 and spec.num_heads * spec.head_size <= 8192)


def _decode_groups(lens: list[int], block_size: int) -> list[tuple[Optional[list[int]], int]]:
    """Decode rows sorted by context length, cut into groups of at most ``DECODE_GROUP_TOKENS``
    padded tokens (at least one row each): ``[(rows, longest)]``; rows None: all, in order."""
    n = len(lens)
    longest = max(lens)
    if n * -(-longest // block_size) * block_size <= DECODE_GROUP_TOKENS:
        return [(None, longest)]
    order = sorted(range(n), key=lens.__getitem__)
    groups, start = [], 0
    for end in range(1, n + 1):  # rows order[start:end]; the last is the longest
        width = -(-lens[order[end - 1]] // block_size) * block_size
        if end - start > 1 and (end - start) * width > DECODE_GROUP_TOKENS:
            groups.append((order[start:end - 1], lens[order[end - 2]]))
            start = end - 1
    groups.append((order[start:], lens[order[-1]]))
    return groups


def _prefill_seqs(batch: AttentionBatch) -> range:
    """Indices of the prefill sequences. Compared first: under ``torch.compile`` the counts are
    symbolic, and ``range`` of them would turn the batch size into a constant."""
    if batch.num_seqs > batch.num_decodes:
        return range(batch.num_decodes, batch.num_seqs)
    return range(0)


def _gather(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Whole blocks by id, as ``[*block_ids.shape, block_size * KVH * D]``.

    index_select over a 2-D view copies contiguous rows; it is several times faster on the CPU
    than advanced indexing of the 4-D cache.
    """
    flat = cache.view(cache.shape[0], -1)
    return flat.index_select(0, block_ids.reshape(-1)).view(*block_ids.shape, -1)


def _write_cache(k, v, k_cache, v_cache, slot_mapping):
    kvh, d = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def _write_cache_padded(k, v, k_cache, v_cache, slot_mapping):
    """Scatter this step's k/v into the cache by slot; rows with slot -1 change nothing.

    Without data-dependent shapes (a captured step cannot drop rows), a slot -1 row rewrites
    what another row writes: the first real row's slot and values, a duplicate write of equal
    values, which is deterministic. A batch of padding only rewrites slot 0 with its own value::

        slots  [ 7, 12, -1, -1]        values [k0, k1, kx, kx]
        write  [ 7, 12,  7,  7]               [k0, k1, k0, k0]
    """
    for new, cache in ((k, k_cache), (v, v_cache)):
        write_rows_padded(new.to(cache.dtype), cache, slot_mapping)


def write_rows_padded(new, cache, slot_mapping):
    """One cache's part of ``_write_cache_padded``: ``new`` ``[T, KVH, D]`` in the cache's
    dtype scattered by slot, rows with slot -1 changing nothing (MLA's latent cache, which has
    no value cache, writes through this alone)."""
    valid = slot_mapping >= 0
    first = torch.argmax(valid.to(torch.int32), dim=0, keepdim=True)  # [1]: first real row or 0
    any_valid = valid.index_select(0, first)  # [1]; index_select, not a host scalar
    slots = torch.where(valid, slot_mapping, slot_mapping.index_select(0, first).clamp(min=0))
    flat = cache.view(-1, *cache.shape[2:])
    fill = torch.where(any_valid[:, None, None], new.index_select(0, first), flat[:1])
    flat.index_copy_(0, slots, torch.where(valid[:, None, None], new, fill))
