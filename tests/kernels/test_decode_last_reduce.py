"""The split-KV decode kernel's last-split reduce (``decode_attention``'s ``counters``,
``TritonAttentionKernel.last_reduce_max_decodes``, TESSELLM_ATTN_LAST_REDUCE): the last split
of each (sequence, KV head) to finish combines the partials instead of a reduce launch. Against
the reference backend and against the separate reduce kernel, outputs and workspace poisoned
with NaN first; the counters must be left zero for the next launch. The interpreter runs the
programs one by one, so the GPU's orderings of the atomics are checked by the sm_90 compile
(the release/acquire counter in the PTX) and by ``benchmarks/b1fp8_device.sh``'s GPU tests.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tessellm.backends.spec import AttentionSpec  # noqa: E402
from tessellm.kernels.attention import (  # noqa: E402
    TritonAttentionKernel, decode_attention, decode_workspace_numel, reshape_and_cache)
from tessellm.kernels.attention.decode import decode_counters_numel  # noqa: E402
from tests.kernels.test_decode_latency import _cos_sin  # noqa: E402
from tests.kernels.test_triton_attention import (  # noqa: E402
    BF16, DEVICE, F32, NUM_KV_HEADS, ON_GPU, _positions, _seed, _tol, assert_matches, make_step)

BIG = 7 if ON_GPU else 1


@pytest.mark.parametrize("dtype,group,head_size,splits,min_partition,window,prefetch", [
    (F32, 4, 64, 8, 0, None, False),
    (BF16, 4, 64, 16, 16, None, True),
    (F32, 3, 32, 4, 16, 40, True),  # a group that is not a power of two, a sliding window
    (BF16, 1, 64, 2, 0, None, False),
])
def test_last_split_reduce_matches_reduce_kernel(dtype, group, head_size, splits, min_partition,
                                                 window, prefetch):
    ctx = [0, 5, 16, 63, 129 * BIG, 300 * BIG]  # some splits hold no key at all
    step = make_step([1] * len(ctx), ctx, group=group, head_size=head_size, block_size=16,
                     dtype=dtype, window=window,
                     seed=_seed("last-reduce", dtype, group, head_size, splits, window))
    b = step.batch
    reshape_and_cache(step.k, step.v, step.k_cache, step.v_cache, b.slot_mapping)
    numel = decode_workspace_numel(len(ctx), step.q.shape[1], splits, head_size)
    counters = torch.zeros(decode_counters_numel(len(ctx), NUM_KV_HEADS), dtype=torch.int32,
                           device=DEVICE)

    def run(ctr):
        out = torch.full_like(step.q, float("nan"))
        decode_attention(step.q, step.k_cache, step.v_cache, out, b.query_start_loc,
                         b.seq_lens, b.block_tables, step.scale, num_seqs=len(ctx),
                         num_splits=splits, sliding_window=window, min_partition=min_partition,
                         prefetch=prefetch, counters=ctr,
                         workspace=torch.full((numel,), float("nan"), device=DEVICE))
        return out

    want = run(None)
    for _ in range(2):  # the second launch finds the counters the first left behind
        out = run(counters)
        assert_matches(out, step.ref_out, dtype)
        # the reduce kernel's arithmetic; only the order of its float32 sums may differ
        torch.testing.assert_close(out, want, atol=1e-6 if dtype == F32 else 2 ** -7,
                                   rtol=1e-5 if dtype == F32 else 2 ** -7)
        assert torch.equal(counters, torch.zeros_like(counters)), "counters must end at zero"


@pytest.mark.parametrize("dtype,group", [(BF16, 4), (F32, 8)])
def test_attention_kernel_last_reduce_with_fused_rotary(dtype, group):
    """The batch-1 path of the engine: the split kernel rotates and caches the new key and the
    last split reduces (one launch a layer), against the two-launch rotary + reduce path."""
    head_size = 64
    ctx = [37 * BIG, 0, 90 * BIG]
    step = make_step([1] * len(ctx), ctx, group=group, head_size=head_size, block_size=16,
                     dtype=dtype, seed=_seed("last-reduce-rotary", dtype, group))
    b = step.batch
    positions = _positions(b)
    cos_sin = _cos_sin(int(b.max_seq_len) + 3, head_size)
    spec = AttentionSpec(num_heads=NUM_KV_HEADS * group, num_kv_heads=NUM_KV_HEADS,
                         head_size=head_size, dtype=dtype, block_size=16)
    kernel = TritonAttentionKernel(spec, max_model_len=4096, max_num_seqs=16)
    md = kernel.build_metadata(b)
    md.num_splits = 4

    kernel.last_reduce_max_decodes = 0
    k_two, v_two = step.k_cache.clone(), step.v_cache.clone()
    want = kernel.forward(step.q.clone(), step.k, step.v, k_two, v_two, md, step.scale,
                          positions=positions, cos_sin_cache=cos_sin)
    assert kernel._counters is None
    kernel.last_reduce_max_decodes = 16
    out = torch.full_like(step.q, float("nan"))
    kernel.forward(step.q.clone(), step.k, step.v, step.k_cache, step.v_cache, md, step.scale,
                   out=out, positions=positions, cos_sin_cache=cos_sin)
    assert kernel._counters is not None and not kernel._counters.any()
    assert torch.equal(step.k_cache, k_two) and torch.equal(step.v_cache, v_two)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, want, **_tol(dtype))


def test_last_reduce_only_where_it_applies(monkeypatch):
    spec = AttentionSpec(num_heads=8, num_kv_heads=2, head_size=64, dtype=BF16, block_size=16)
    monkeypatch.delenv("TESSELLM_ATTN_LAST_REDUCE", raising=False)
    assert TritonAttentionKernel(spec, 4096, 64).last_reduce_max_decodes == 0  # default off
    monkeypatch.setenv("TESSELLM_ATTN_LAST_REDUCE", "1")
    kernel = TritonAttentionKernel(spec, 4096, 64)
    assert kernel.last_reduce_max_decodes == kernel.prefetch_max_decodes
    cpu = torch.device("cpu")
    assert kernel._decode_buffers(1, cpu)["counters"] is not None
    assert kernel._decode_buffers(16, cpu)["counters"] is not None
    assert kernel._decode_buffers(17, cpu)["counters"] is None  # a larger batch: reduce kernel
    assert kernel._decode_buffers(2, cpu, query_len=3)["counters"] is None  # a verify step
    assert kernel._counters.numel() == 16 * 2 and kernel._counters.dtype == torch.int32
    monkeypatch.setenv("TESSELLM_ATTN_LAST_REDUCE", "0")
    assert TritonAttentionKernel(spec, 4096, 64)._decode_buffers(1, cpu)["counters"] is None


_COMPILE = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tessellm.kernels.attention import decode as dec

fn = dec._decode_split_kernel
consts = dict(NUM_HEADS=32, GROUP=4, BLOCK_M=16, QUERY_LEN=1, GROUP_P2=4, NUM_SPLITS=16,
              MIN_PART=64, BLOCK_N=64, HEAD_SIZE=128, BLOCK_SIZE=16, USE_WINDOW=False,
              DOT_PREC="ieee", DOT_FP32=False, FP8_PTX=0, REDUCE=2, PREFETCH=True, ROTARY=True,
              HEAD_MAJOR=False, USE_PDL=True, SOFTCAP=False, SINKS=False)
sig, attrs = {}, {}
ints = {"seq_lens_ptr", "query_start_loc_ptr", "block_tables_ptr", "counter_ptr"}
for i, name in enumerate(fn.arg_names):
    if name in consts:
        sig[name] = "constexpr"
    elif name in ints:
        sig[name], attrs[(i,)] = "*i32", [["tt.divisibility", 16]]
    elif name in ("pos_ptr", "slot_ptr"):
        sig[name], attrs[(i,)] = "*i64", [["tt.divisibility", 16]]
    elif name in ("part_out_ptr", "part_m_ptr", "part_l_ptr", "cos_sin_ptr", "sinks_ptr"):
        sig[name], attrs[(i,)] = "*fp32", [["tt.divisibility", 16]]
    elif name.endswith("_ptr"):
        sig[name], attrs[(i,)] = "*bf16", [["tt.divisibility", 16]]
    elif name in ("scale_log2", "v_scale", "softcap"):
        sig[name] = "fp32"
    else:
        sig[name] = "i32"
src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=3))
ptx = k.asm["ptx"]
print("RESULT" + json.dumps(dict(
    atom_acq_rel=sum("atom" in l and ".acq_rel" in l and ".gpu" in l for l in ptx.splitlines()),
    exch=sum("atom" in l and ".exch" in l for l in ptx.splitlines()),
    cg_loads=sum("ld.global.cg" in l for l in ptx.splitlines()),
    bar=ptx.count("bar.sync") + ptx.count("barrier.sync"),
    gdc=ptx.count("griddepcontrol"), shared=k.metadata.shared)))
"""


def test_last_reduce_compiles_for_sm90():
    """The engine's batch-1 variant (fused rotary, prefetch, PDL, 16 splits, Llama-8B heads)
    compiled for sm_90: the counter is a gpu-scope acq_rel atomic after a CTA barrier, its
    reset an exchange, the partials re-read with L1 bypassed (ld.global.cg)."""
    from tests.kernels.offline_compile import run_compile_script

    proc = run_compile_script(_COMPILE)
    assert proc.returncode == 0 and "RESULT" in proc.stdout, proc.stderr[-3000:]
    k = __import__("json").loads(proc.stdout.split("RESULT", 1)[1])
    print(k)
    assert k["atom_acq_rel"] >= 1 and k["exch"] >= 1, k
    assert k["cg_loads"] >= 3 and k["bar"] >= 1 and k["gdc"] >= 2, k
