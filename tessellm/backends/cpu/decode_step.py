"""One layer's step of float32 decodes in one C call (``csrc/decode_step.c``): NeoX rotary of q
and k in place, k and v written into the paged cache at their slots, then the paged decode
attention, where the separate path makes ~15 aten and ctypes calls. Used by
``CpuAttentionKernel.forward`` (``fuses_rotary``) when every sequence of an eager step is a
decode; each part is the separate path's arithmetic, so the output and the caches are bitwise
what rotating first and calling ``forward`` without the rotary inputs gives
(tests/backends/test_cpu_native.py)."""

from __future__ import annotations

import torch


def fusable(q, k, v, positions, cos_sin) -> bool:
    """Whether ``tl_decode_step`` reads these as they are: float32 ``[T, heads, D]`` views of
    unit inner stride, the rotary over the whole head (``cos_sin`` ``[*, D]``), int64
    positions."""
    d = q.shape[-1]
    return (all(t.dtype == torch.float32 and t.stride(2) == 1 and t.stride(1) == d for t in (q, k, v))
            and cos_sin.dtype == torch.float32 and cos_sin.stride(-1) == 1 and cos_sin.shape[-1] == d
            and positions.dtype == torch.int64 and positions.is_contiguous())


def decode_step(lib, q, k, v, k_cache, v_cache, nat, positions, cos_sin, scale: float, window,
                softcap=None, sinks=None):
    """The attention output ``[n, H, D]`` float32 of ``nat.n`` decodes (``attention.NativeDecode``:
    int32 tables and lengths, int64 slots); q and k are rotated in place. ``softcap``: the
    layer's logit soft-cap, or None; ``sinks``: its attention sinks, float32 contiguous ``[H]``,
    or None."""
    n, num_heads, head_size = q.shape
    out = torch.empty(q.shape, dtype=torch.float32)
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.dtype == v_cache.dtype
    rc = lib.tl_decode_step(
        q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
        positions.data_ptr(), cos_sin.data_ptr(), cos_sin.stride(0), nat.slots.data_ptr(),
        k_cache.data_ptr(), v_cache.data_ptr(), int(k_cache.dtype == torch.bfloat16),
        nat.tables.data_ptr(), nat.tables.shape[1], nat.seq_lens.data_ptr(), n, num_heads,
        k_cache.shape[2], head_size, k_cache.shape[1], window or 0, scale, softcap or 0.0,
        None if sinks is None else sinks.data_ptr(), out.data_ptr(), torch.get_num_threads())
    if rc:
        raise RuntimeError(f"tl_decode_step refused heads={num_heads} kv_heads={k_cache.shape[2]} "
                           f"head_size={head_size}")
    return out
