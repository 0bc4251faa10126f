"""NeoX rotary fused into the Triton KV-cache write (``rotary_and_cache``, ``fuses_rotary``).

Checked three ways: the fused kernel against the two launches it replaces (``TritonOps.
rotary_embedding`` then ``reshape_and_cache``: bit for bit), against the reference backend
(rotate with ``ReferenceOps``, write with ``write_kv_cache``), and through the model's
``DecoderAttention``, which must take the fused path with the Triton kernel and give what the
reference kernel and ops give. Caches are poisoned with NaN first: written slots are compared
byte for byte, every other slot must still hold the poison.
"""

from __future__ import annotations

import math
import zlib
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from tessellm.kernels.attention import (  # noqa: E402
    TritonAttentionKernel, reshape_and_cache, rotary_and_cache)
from tessellm.kernels.fused_ops import TritonOps  # noqa: E402
from tessellm.backends.reference.attention import (  # noqa: E402
    ReferenceAttentionKernel, write_kv_cache)
from tessellm.backends.reference.ops import ReferenceOps  # noqa: E402
from tessellm.backends.spec import AttentionSpec  # noqa: E402
from tessellm.backends.spec import AttentionBatch  # noqa: E402
from tessellm.layers.context import ModelContext  # noqa: E402
from tessellm.layers.rotary import RotaryEmbedding  # noqa: E402
from tessellm.models.decoder import DecoderAttention  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
F32, BF16, F16, FP8 = torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn
MAX_POS = 4096 if ON_GPU else 100


# Against the reference. On the CPU the interpreter rounds float32 -> bf16 toward zero (the
# GPU to nearest), so a bf16 product may be an ulp off torch's (|x| < 8 here: 1/16), and its
# float32 -> e4m3 conversion drops the carry when rounding up to a power of two (1.99 -> 1.0).
_TOL = {F32: dict(atol=1e-5, rtol=1e-5), F16: dict(atol=2e-3, rtol=2e-3),
        BF16: dict(atol=7e-2, rtol=2e-2),
        FP8: dict(atol=2e-3, rtol=1 / 8 if ON_GPU else 0.51)}  # e4m3: an ulp is <= 1/8


def _gen(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def _cos_sin(head_size: int, max_pos: int = MAX_POS) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_size, 2).float() / head_size))
    freqs = torch.arange(max_pos).float()[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(DEVICE)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN poison included), whatever the dtype."""
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8),
                                              b.contiguous().view(torch.uint8))


def _qkv(num_tokens, num_heads, num_kv_heads, head_size, dtype, gen):
    """q, k, v as strided views into one fused qkv projection, like the model has them."""
    q_size, kv_size = num_heads * head_size, num_kv_heads * head_size
    qkv = (2 * torch.randn(num_tokens, q_size + 2 * kv_size, generator=gen)).to(dtype).to(DEVICE)
    q = qkv[:, :q_size].view(num_tokens, num_heads, head_size)
    k = qkv[:, q_size:q_size + kv_size].view(num_tokens, num_kv_heads, head_size)
    v = qkv[:, q_size + kv_size:].view(num_tokens, num_kv_heads, head_size)
    return q, k, v


# (dtype, cache dtype, head_size, block_size, num_heads, num_kv_heads, k_scale, v_scale)
CASES = [
    (F32, F32, 64, 16, 8, 2, 1.0, 1.0),
    (BF16, BF16, 128, 32, 8, 1, 1.0, 1.0),  # GQA 8
    (F16, F16, 64, 5, 6, 3, 1.0, 1.0),  # block size 5: positions and slots cross blocks oddly
    (BF16, FP8, 64, 16, 4, 4, 1.0, 1.0),
    (F16, FP8, 128, 16, 4, 2, 0.05, 0.5),  # small k_scale: large k / k_scale saturates at 448
    (F32, FP8, 64, 8, 2, 2, 2.0, 0.25),
]


@pytest.mark.parametrize("dtype,cache_dtype,head_size,block_size,num_heads,num_kv_heads,"
                         "k_scale,v_scale", CASES)
def test_rotary_and_cache_equals_rotary_then_cache_write(dtype, cache_dtype, head_size,
                                                         block_size, num_heads, num_kv_heads,
                                                         k_scale, v_scale):
    gen = _gen("fused", dtype, cache_dtype, head_size, block_size, num_heads, k_scale)
    num_tokens, num_blocks = (300, 64) if ON_GPU else (11, 5)
    q, k, v = _qkv(num_tokens, num_heads, num_kv_heads, head_size, dtype, gen)
    positions = torch.randint(0, MAX_POS, (num_tokens,), generator=gen).to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[1::3] = -1  # padded graph rows: q still rotated, nothing written
    slots = slots.to(DEVICE)
    cos_sin = _cos_sin(head_size)
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    k_cache = torch.full(shape, float("nan"), device=DEVICE).to(cache_dtype)
    v_cache = torch.full(shape, float("nan"), device=DEVICE).to(cache_dtype)
    q_before, k_before, v_before = q.clone(), k.clone(), v.clone()

    # The two launches the fused kernel replaces.
    sep_q, sep_k = q.clone(), k.clone()
    TritonOps().rotary_embedding(positions, sep_q, sep_k, cos_sin, head_size)
    sep_kc, sep_vc = k_cache.clone(), v_cache.clone()
    reshape_and_cache(sep_k, v, sep_kc, sep_vc, slots, k_scale, v_scale)

    rotary_and_cache(q, k, v, k_cache, v_cache, slots, positions, cos_sin, k_scale, v_scale)
    assert _same_bytes(q, sep_q), "q: every token's heads rotated in place, slot -1 included"
    assert _same_bytes(k_cache, sep_kc) and _same_bytes(v_cache, sep_vc)
    assert _same_bytes(k, k_before) and _same_bytes(v, v_before), "k and v are read only"
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    written[slots[slots >= 0]] = True
    for cache in (k_cache, v_cache):
        flat = cache.view(-1, num_kv_heads, head_size).float()
        assert torch.isnan(flat[~written]).all(), "a slot not in slot_mapping was written"
        assert not torch.isnan(flat[written]).any(), "a slot in slot_mapping was not written"

    # The reference backend: rotate, then scatter the (scaled, saturated) values.
    ref_q, ref_k = ReferenceOps().rotary_embedding(positions, q_before.clone(), k_before.clone(),
                                                   cos_sin, head_size)
    tol = _TOL[dtype]
    torch.testing.assert_close(q, ref_q, **tol)
    fp8 = cache_dtype == FP8
    ref_kc = torch.full(shape, float("nan"), device=DEVICE)
    ref_vc = torch.full(shape, float("nan"), device=DEVICE)
    write_kv_cache((ref_k.float() / k_scale).clamp(-448, 448) if fp8 else ref_k.float(),
                   (v_before.float() / v_scale).clamp(-448, 448) if fp8 else v_before.float(),
                   ref_kc, ref_vc, slots)
    if fp8:  # the rotary's error, scaled by 1 / scale, plus the e4m3 rounding
        tol = dict(atol=_TOL[FP8]["atol"] + tol["atol"] / min(k_scale, v_scale),
                   rtol=_TOL[FP8]["rtol"] + tol["rtol"])
    torch.testing.assert_close(k_cache.float(), ref_kc, equal_nan=True, **tol)
    torch.testing.assert_close(v_cache.float(), ref_vc, equal_nan=True, **tol)


# ---------------------------------------------------------------------------------------------
# The model takes the fused path when the kernel declares it
# ---------------------------------------------------------------------------------------------


class CountingOps(TritonOps):
    """TritonOps that count rotary launches, to see which path the model took."""

    def __init__(self):
        self.rotary_calls = 0

    def rotary_embedding(self, *args, **kwargs):
        self.rotary_calls += 1
        return super().rotary_embedding(*args, **kwargs)


class OwnForwardKernel(TritonAttentionKernel):
    """A subclass with its own forward that does not say it fuses rotary: it must not be asked."""

    def forward(self, q, k, v, k_cache, v_cache, metadata, scale, out=None):
        return super().forward(q, k, v, k_cache, v_cache, metadata, scale, out)


def _mixed_batch(query_lens, ctx_lens, block_size):
    """Decodes first; sequence s owns blocks ``s * per_seq ...`` in order."""
    seq_lens = [c + q for c, q in zip(ctx_lens, query_lens)]
    per_seq = math.ceil(max(seq_lens) / block_size)
    tables = torch.arange(len(seq_lens) * per_seq, dtype=torch.int32).view(len(seq_lens), -1)
    slots, positions, qsl = [], [], [0]
    for s, (c, n) in enumerate(zip(ctx_lens, seq_lens)):
        positions += range(c, n)
        slots += [int(tables[s, p // block_size]) * block_size + p % block_size
                  for p in range(c, n)]
        qsl.append(qsl[-1] + n - c)
    batch = AttentionBatch(
        num_tokens=len(slots), num_seqs=len(seq_lens),
        num_decodes=sum(1 for n in query_lens if n == 1),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=tables.to(DEVICE), slot_mapping=torch.tensor(slots, device=DEVICE),
        max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        query_start_loc_host=qsl, seq_lens_host=seq_lens)
    return batch, torch.tensor(positions, device=DEVICE), len(seq_lens) * per_seq


@pytest.mark.parametrize("qk_norm", [False, True])
def test_decoder_attention_fuses_rotary_only_when_the_kernel_declares_it(qk_norm):
    heads, kv_heads, head_size, block_size, hidden = 4, 2, 64, 16, 96
    config = SimpleNamespace(hidden_size=hidden, num_attention_heads=heads,
                             num_key_value_heads=kv_heads, head_dim=head_size,
                             rms_norm_eps=1e-6)
    spec = AttentionSpec(num_heads=heads, num_kv_heads=kv_heads, head_size=head_size,
                         dtype=F32, block_size=block_size)
    batch, positions, num_blocks = _mixed_batch([1, 1, 7, 3], [9, 20, 0, 21], block_size)
    gen = _gen("decoder", qk_norm)
    hidden_states = torch.randn(batch.num_tokens, hidden, generator=gen).to(DEVICE)
    cache = torch.randn(num_blocks, block_size, kv_heads, head_size, generator=gen).to(DEVICE)

    def build(ops, kernel):
        ctx = ModelContext(ops=ops, dtype=F32, device=DEVICE,
                           make_attention_kernel=lambda window, logit_softcap=None: kernel)
        rotary = RotaryEmbedding(head_size, 64, 10000.0, None, ops).to(DEVICE)
        layer = DecoderAttention(config, ctx, rotary, qkv_bias=False, qk_norm=qk_norm).to(DEVICE)
        layer.attn.k_cache, layer.attn.v_cache = cache.clone(), cache.clone() + 1
        return layer

    ref = build(ReferenceOps(), ReferenceAttentionKernel())
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    ref_out = ref(positions, hidden_states, batch)
    assert not ref.fuse_rotary

    for kernel_type, fused in ((TritonAttentionKernel, True), (OwnForwardKernel, False)):
        ops = CountingOps()
        kernel = kernel_type(spec, max_model_len=256, max_num_seqs=8)
        layer = build(ops, kernel)
        layer.load_state_dict(ref.state_dict())
        assert layer.fuse_rotary is fused and kernel.fuses_rotary is fused
        out = layer(positions, hidden_states, kernel.build_metadata(batch))
        assert ops.rotary_calls == (0 if fused else 1)
        torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(layer.attn.k_cache, ref.attn.k_cache, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.attn.v_cache, ref.attn.v_cache, atol=0, rtol=0)
