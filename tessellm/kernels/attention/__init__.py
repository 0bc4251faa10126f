"""Paged attention in Triton: cache write (with NeoX rotary fused in), varlen prefill,
split-KV decode.

KV cache layout (see ``tessellm/backends/spec.py``): ``k_cache``/``v_cache`` ``[num_blocks, block_size,
KVH, D]``. Token ``t`` of sequence ``s`` lives at block ``block_tables[s, t // block_size]``,
offset ``t % block_size``::

    block_tables[s] = [7, 2, 9]       block_size = 4, seq_len = 10
    tokens 0..3 -> block 7, 4..7 -> block 2, 8..9 -> block 9 (offsets 0, 1)

The flat batch holds decode sequences first (one query each), then prefill chunks. Query ``i``
of sequence ``s`` sits at position ``seq_lens[s] - query_len(s) + i`` and sees keys ``<=`` it
(and ``> pos - window`` with a sliding window).

GQA: one program handles all ``G = H / KVH`` query heads of one KV head, packed as rows of a
``[BLOCK_M, D]`` tile (``row = query * G_P2 + g``), so every K/V tile is loaded once per group.

Decode is split-KV: grid ``(num_decodes, KVH, num_splits)`` with ``num_splits`` a host int
fixed per batch size (graph-capture safe). A sequence of length L is cut into parts of
``max(roundup(cdiv(L, num_splits), BLOCK_N), MIN_PART)`` keys, computed in the kernel from
``seq_lens``; splits past L are empty and write (out=0, m=-1e30, l=0), which the reduction
weighs as zero. A sequence of length 0 (graph padding) gives output 0, never NaN.
With one split (large batches) the split kernel writes the output itself (``fused_reduce``);
with more, ``_decode_reduce_kernel`` combines the partials in a second launch. (Reducing in the
last split program to finish, through per-(sequence, KV head) atomic counters, was tried and
measured slower at batch 1 on an H200: 4.54 against 4.34 ms per token for Llama-8B shapes; the
counters' registers and the serial tail cost more than the launch they save. That was before
PDL, the prefetch and the fused rotary, with 32 splits. It is back as an opt-in for small decode
batches, ``TritonAttentionKernel.last_reduce_max_decodes`` / TESSELLM_ATTN_LAST_REDUCE=1, off by
default: the counter after the main loop, the last program reading all its group's partials
in one ``[G, splits, D]`` tile; ``benchmarks/b1fp8_device.sh`` times it against the reduce
kernel.)
No host-device sync anywhere in ``forward``.

Small decode batches (at most ``prefetch_max_decodes`` = 16, latency-bound: at batch 1 the
block cost 11 us a layer for 0.7 us of K/V reads on an H200) take three measures
(benchmarks/README.md, wave 2e): at most 16 splits of at least 64 keys; each program loads its
first K/V tile of earlier steps' keys before the PDL wait (``pdl.py``), re-reading this step's
keys after it; and a pure-decode step with a 16-bit cache does the rotary and the cache write
inside the split kernel (``decode._new_key``: every program rotates its q rows, the program whose
split holds the new key rotates it, writes k and v and takes it from registers), one launch less.
B1 chain 4.12 -> 3.99 ms, engine B1 4.16 -> 3.99.

Large decode batches (at least 128 plain decodes) take their launch shape (BLOCK_N, warps,
pipeline stages, grid order, splits, e4m3 widening) from ``decode_table.py``, measured per cache
kind by ``benchmarks/quantization/decode_sweep.py``; H200, fp8 cache: 5 stages (two K/V buffers
instead of one: the paged loads cost the pipeliner a stage) and "kdot" widening (below), 158 ->
114 us a Llama-8B layer at batch 256.

Cache write: one program per token writes its k and v at ``slot_mapping`` (-1: skipped). When
the model hands over the rotary inputs (``fuses_rotary``), the same program first NeoX-rotates
the token's q heads in place (padding rows with slot -1 too) and rotates k on its way to the
cache (``rotary_and_cache``), with ``TritonOps.rotary_embedding``'s rounding: one launch per
layer instead of two. Prefill and decode read k only from the cache, never from ``k``.

fp8 KV cache (``kv_cache_dtype="fp8"``): the cache holds e4m3 values ``k / k_scale`` and
``v / v_scale`` (per-tensor scales, host floats on the kernel, 1.0 unless set); the cache write
divides and saturates at +-448, the attention kernels widen each tile and fold the scales in:
``k_scale`` into the softmax scale, ``v_scale`` into the output normalisation.

How an e4m3 tile is widened matters more than the bytes it saves (``FP8_PTX``). Left to
Triton, ``v.to(bf16)`` is moved past the shared-memory staging of the dot: V (``[keys, D]``,
D contiguous) is the dot's right operand with its reduction dim strided, which 16-bit tiles
read with ``ldmatrix.trans`` but 8-bit tiles only byte by byte (``ld.shared.b8``, bank
conflicts). On sm89+ NVIDIA GPUs each tile is therefore widened in registers right after its
load, by ``cvt.rn.f16x2.e4m3x2`` in inline PTX (opaque to Triton, so it stays there), and the
dots run in fp16: e4m3 is exact in fp16, q enters pre-multiplied by the softmax scale (fp16
holds q * scale up to 65504: |q| up to ~5e5 at head size 128 and k_scale 1), and P in fp16
keeps three more mantissa bits than in bf16::

    q16 = fp16(q * scale_log2)          once per program
    s   = dot(q16, fp16(k8)^T)          k8: the e4m3 tile, widened in registers
    acc = acc * alpha + dot(fp16(p), fp16(v8))

Elsewhere (float32 q, e4m3fnuz, the CPU interpreter) tiles widen with ``.to(q.dtype)``.
``fp8_convert`` selects another way for tests and benchmarks: "triton" (the ``.to`` path) or
"bits" (``e4m3_to_16bit``, no conversion unit; measured slower than "cvt" here), "kdot" (fp16
dots; K widened by Triton inside the dot's operand load, which is fine for K, whose reduction dim
is contiguous, and saves its second trip through shared memory; V by ``cvt``) and "native16" (both
by Triton). ``decode_table`` picks "kdot" for large decode batches: 150 -> 114 us a layer at batch
256 with 5 stages. H200, batch
256, Llama-8B heads, one layer: 236 us with "triton", 201 with "cvt", 210 with the bf16 cache
(benchmarks/quantization/README.md).

Logit soft-capping (``logit_softcap``, Gemma 2): each scaled score becomes ``cap * tanh(s / cap)``
before the mask, in ``_scores`` (and ``decode._new_key``) behind the ``SOFTCAP`` constexpr, with
the cap in the scores' log2 units (``common._softcap``: tanh through one exp2 and one fast
division). Off, nothing is compiled in: PTX for sm90 compiled without a GPU (prefill 64 x 64,
decode, decode with prefetch and fused rotary) has the same instructions as before the feature
but for one reordered parameter load and register names; on, the prefill kernel's PTX grows from
3,860 to 4,188 instruction lines (an ex2 and a div.full.f32 per score).

Attention sinks (``sinks``, gpt-oss): each head's learned logit joins its rows' softmax as a key
with no value, once per row after the keys (``common._join_sinks``: the max may rise, the sum
gains ``2^(sink - max)``), behind the ``SINKS`` constexpr: in the prefill kernel, in the
split-KV decode when its one split writes the output, else only in the reduce kernel (a split's
partial never holds it, so it is not counted once per split). Off, sm90 PTX compiled without a
GPU (bf16, head 128: prefill with and without a window, decode one-split, several splits,
prefetch with fused rotary, the reduce) has the same multiset of instructions as before the
feature, only a few parameter loads and address computations reordered; on, prefill grows from
4,168 to 4,268 PTX lines, the one-split decode 2,004 -> 2,057, the reduce 231 -> 244.

Files: ``common.py`` (the shared tile, fp8 widening, checks), ``cache.py`` (the cache write),
``prefill.py``, ``decode.py``, ``paged.py`` (``TritonAttentionKernel``, the contract's protocol).
"""

from tessellm.kernels.attention.cache import reshape_and_cache, rotary_and_cache
from tessellm.kernels.attention.decode import decode_attention, decode_workspace_numel
from tessellm.kernels.attention.paged import (
           TritonAttentionKernel,
           TritonAttentionMetadata,
)
from tessellm.kernels.attention.prefill import prefill_attention

__all__ = ["TritonAttentionKernel", "TritonAttentionMetadata", "decode_attention",
           "decode_workspace_numel", "prefill_attention", "reshape_and_cache", "rotary_and_cache"]
