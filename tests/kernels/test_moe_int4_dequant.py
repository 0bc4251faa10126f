"""The large-batch path of AWQ / GPTQ int4 MoE experts (``kernels/moe/int4_dequant.py``):
the experts dequantized a chunk at a time, then the 16-bit grouped GEMMs. Against the reference
op (``fused_experts_reference``, float32): zero codes or 8, GPTQ act order, one chunk or many,
SiLU-and-mul fused or apart, expert parallelism; the dequantization bit for bit against
``reference.moe.dequantize_int4``; the dispatch by token count (decode kernels, tensor-core
grouped GEMM, dequantized) and the workspace freed after each GEMM. Triton's interpreter on a
CPU (tiny sizes), the GPU where there is one (also Qwen3-30B-A3B-sized experts)."""

from __future__ import annotations

import gc
import importlib
import json
import weakref

import pytest
import torch

pytest.importorskip("triton")

from tessellm.backends.reference.moe import (dequantize_int4, fused_experts_reference,  # noqa: E402
                                             route)
from tessellm.kernels.moe import fused_moe_triton  # noqa: E402
from tessellm.kernels.moe import int4_dequant as dq  # noqa: E402
from tessellm.kernels.moe import int4_tc_moe as tm  # noqa: E402
from tests.quantization.int4_checkpoint import random_int4_experts as _experts  # noqa: E402
from tests.kernels.offline_compile import run_compile_script  # noqa: E402

fm = importlib.import_module("tessellm.kernels.moe.fused_moe")  # (the package's name is the op)

ON_GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if ON_GPU else "cpu")


def _case(tokens, e, h, i, zeros=True, act_order=False, seed=0, expert_map=None, top_k=2):
    q13, s13, z13 = _experts(e, 2 * i, h, 128, seed)
    q2, s2, z2 = _experts(e, h, i, 128, seed + 1)
    if not zeros:
        z13 = z2 = None
    g = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(tokens, h, generator=g)
    n_global = e if expert_map is None else expert_map.numel()
    weights, ids = route(torch.randn(tokens, n_global, generator=g), top_k)
    perm = (torch.stack([torch.randperm(h, generator=g) for _ in range(e)]).to(torch.int32)
            if act_order else None)
    kw = dict(int4=True, w13_zeros=z13, w2_zeros=z2, expert_map=expert_map)
    want = fused_experts_reference(x, weights, ids, q13, q2, s13, s2, w13_perm=perm, **kw)
    to = (lambda t: None if t is None else t.to(DEV))  # noqa: E731
    args = [to(t) for t in (x, weights, ids.to(torch.int32), q13, q2, s13, s2)]
    kw = dict(int4=True, w13_zeros=to(z13), w2_zeros=to(z2), w13_perm=to(perm),
              expert_map=to(expert_map))
    return args, kw, want


@pytest.fixture
def workspaces(monkeypatch):
    """Each workspace ``dequantize_int4_experts`` returns inside the fused MoE, as a weak
    reference and its shape (the function itself runs unchanged)."""
    seen = []
    real = dq.dequantize_int4_experts

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append((weakref.ref(out), tuple(out.shape)))
        return out

    monkeypatch.setattr(fm, "dequantize_int4_experts", spy)
    return seen


@pytest.mark.parametrize("group, zeros, lo, hi", [(128, True, 0, 3), (32, False, 1, 3),
                                                  (256, True, 2, 3)])
def test_dequantize_equals_reference(group, zeros, lo, hi):
    """float32 bit for bit (a scale a row where a program's inputs lie in one group, a scale
    an input otherwise); bf16 bit for bit on a GPU (the interpreter truncates its cast: one
    bf16 step there)."""
    q, s, z = _experts(3, 40, 256, group, seed=group)
    z = z if zeros else None
    q, s, z = (None if t is None else t.to(DEV) for t in (q, s, z))
    got = dq.dequantize_int4_experts(q, s, z, torch.float32, lo, hi)
    assert got.shape == (hi - lo, 40, 256)
    assert torch.equal(got, dequantize_int4(q[lo:hi], s[lo:hi], None if z is None else z[lo:hi],
                                            torch.float32))
    got16 = dq.dequantize_int4_experts(q, s, z, torch.bfloat16, lo, hi).float()
    want16 = dequantize_int4(q[lo:hi], s[lo:hi], None if z is None else z[lo:hi],
                             torch.bfloat16).float()
    if ON_GPU:
        assert torch.equal(got16, want16)
    else:
        torch.testing.assert_close(got16, want16, rtol=2 ** -7, atol=0)


def test_dequantize_skips_experts_not_hit():
    """``hit[e]`` 0: expert e's rows are not written (the buffer keeps what it held)."""
    q, s, z = (t.to(DEV) for t in _experts(3, 16, 128, 128, seed=1))
    hit = torch.tensor([1, 0, 1, 0], dtype=torch.int32, device=DEV)
    buf = torch.full((3, 16, 128), float("nan"), device=DEV)
    got = dq.dequantize_int4_experts(q, s, z, torch.float32, 0, 3, hit, out=buf)
    assert got is buf
    want = dequantize_int4(q, s, z, torch.float32)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    assert torch.isnan(got[1]).all()


@pytest.mark.parametrize("zeros, act_order, budget_mb, fuse", [
    (True, False, None, True), (False, True, None, False), (True, True, 0.3, True),
    (True, False, 0.3, False)])
def test_dequant_path_matches_reference(zeros, act_order, budget_mb, fuse, monkeypatch,
                                        workspaces):
    """From the threshold the fused MoE dequantizes (one chunk of all 4 experts, or one an
    expert with a 0.3 MB budget) and its output equals the reference in float32 to
    reassociation; SiLU-and-mul in GEMM 1's epilogue or apart (the 16-bit rule's large
    tiles)."""
    monkeypatch.setenv("TESSELLM_MOE_INT4_DEQUANT_TOKENS", "8")
    if budget_mb is not None:
        monkeypatch.setattr(dq, "MOE_INT4_DEQUANT_WORKSPACE_MB", budget_mb)
    tiles = fm._tiles
    monkeypatch.setattr(fm, "_tiles", lambda *a, **k: dict(tiles(*a, **k), SILU_MUL=fuse))
    args, kw, want = _case(9, 4, 256, 128, zeros, act_order, seed=int(zeros) + 2 * act_order)
    got = fused_moe_triton(*args, **kw)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    chunks = 1 if budget_mb is None else 4  # 256 x 256 float32: 0.25 MB an expert
    assert [shape[0] for _, shape in workspaces] == [4 // chunks] * (2 * chunks)


def test_dequant_path_expert_parallel(monkeypatch, workspaces):
    """``expert_map``: this rank holds 3 of 6 experts; the other pairs' slots stay zero, as
    the reference's; two chunks (a 0.5 MB budget, two experts of 0.25 MB each then one)."""
    monkeypatch.setenv("TESSELLM_MOE_INT4_DEQUANT_TOKENS", "8")
    monkeypatch.setattr(dq, "MOE_INT4_DEQUANT_WORKSPACE_MB", 0.5)
    expert_map = torch.tensor([-1, 0, -1, 1, 2, -1], dtype=torch.int32)
    args, kw, want = _case(10, 3, 256, 128, seed=5, expert_map=expert_map)
    got = fused_moe_triton(*args, **kw)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    assert [shape[0] for _, shape in workspaces] == [2, 1, 2, 1]


def test_dispatch_by_tokens(monkeypatch, workspaces):
    """Up to the decode bound (4) the int4 decode kernels, then the tensor-core grouped GEMM
    (its alignment block: 16), from the threshold the dequantized path alone; 0 turns it off,
    and given tiles (benchmarks) never take it."""
    monkeypatch.setenv("TESSELLM_MOE_INT4_DEQUANT_TOKENS", "6")
    calls = []
    for name in ("moe_int4_tc_gemm", "fused_moe_int4_decode"):
        real = getattr(fm, name)
        monkeypatch.setattr(fm, name, lambda *a, _real=real, _name=name, **k: (
            calls.append((_name, a[10] if _name == "moe_int4_tc_gemm" else None)),
            _real(*a, **k))[1])
    args, kw, _ = _case(6, 4, 128, 128, seed=7)

    def paths(tokens, tiles=None):
        workspaces.clear()
        calls.clear()
        fused_moe_triton(*[a[:tokens] if i < 3 else a for i, a in enumerate(args)], tiles,
                         **kw)
        return sorted(set(calls)) + (["dequantized"] if workspaces else [])

    assert paths(3) == [("fused_moe_int4_decode", None)]
    assert paths(5) == [("moe_int4_tc_gemm", 16)]
    assert paths(6) == ["dequantized"]
    assert paths(6, dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64)) == [("moe_int4_tc_gemm", 32)]
    monkeypatch.setenv("TESSELLM_MOE_INT4_DEQUANT_TOKENS", "0")
    assert paths(6) == [("moe_int4_tc_gemm", 16)]
    monkeypatch.setenv("TESSELLM_MOE_INT4_DEQUANT_TOKENS", "lots")
    with pytest.raises(ValueError, match="TESSELLM_MOE_INT4_DEQUANT_TOKENS"):
        dq.moe_int4_dequant_tokens()


def test_defaults():
    """The threshold lies where the H100's crossover lies (session 27: 1536-2048 tokens), on by
    default; the tensor-core path's alignment block is 16 up to 16 pairs an expert, then 32;
    a chunk takes all experts that fit the budget, else equal chunks."""
    assert 1024 < dq.MOE_INT4_DEQUANT_TOKENS == dq.MOE_INT4_DEQUANT_SUGGESTED <= 4096
    assert tm.moe_int4_tc_block_m(16 * 128, 128) == 16
    assert tm.moe_int4_tc_block_m(16 * 128 + 1, 128) == 32
    # Qwen3-30B-A3B: w13 [128, 1536, 2048] bf16, 6.3 MB an expert, 805 MB in all: 2 chunks
    assert dq.expert_chunk(128, 1536 * 2048, 2, 512) == 64
    assert dq.expert_chunk(128, 1536 * 2048, 2, 1024) == 128
    assert dq.expert_chunk(4, 1536 * 2048, 2, 1) == 1


def test_workspace_not_resident(monkeypatch, workspaces):
    """Every workspace is gone once the call returns (nothing keeps the 16-bit experts); on a
    GPU the allocated memory is back to what it was, less the output."""
    monkeypatch.setenv("TESSELLM_MOE_INT4_DEQUANT_TOKENS", "8")
    monkeypatch.setattr(dq, "MOE_INT4_DEQUANT_WORKSPACE_MB", 0.3)
    args, kw, _ = _case(9, 4, 256, 128, seed=11)
    fused_moe_triton(*args, **kw)  # compiled, and any lazily made state in place
    workspaces.clear()
    if ON_GPU:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
    out = fused_moe_triton(*args, **kw)
    gc.collect()
    assert len(workspaces) == 8 and all(ref() is None for ref, _ in workspaces)
    if ON_GPU:
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() - before <= out.numel() * out.element_size() + 512


@pytest.mark.skipif(not ON_GPU, reason="Qwen3-30B-A3B-sized experts need a GPU")
@pytest.mark.parametrize("tokens", [48, 1024])
def test_dequant_path_qwen3_shapes_on_gpu(tokens, monkeypatch):
    """Hidden 2048, intermediate 768, 16 experts (of 128), top-8, bf16 activations, the
    engine's own 16-bit tiles (48 tokens: 32-pair blocks, SiLU fused; 1024: the prefill tile,
    apart); against the reference in float32."""
    monkeypatch.setenv("TESSELLM_MOE_INT4_DEQUANT_TOKENS", "16")
    args, kw, want = _case(tokens, 16, 2048, 768, seed=tokens, top_k=8)
    args[0] = args[0].to(torch.bfloat16)
    got = fused_moe_triton(*args, **kw).float().cpu()
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 2e-2, err


_COMPILE_DEQUANT = """
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tessellm.kernels.moe import int4_dequant as dq

fn = dq._dequant_int4_kernel
block_n, block_w, warps = dq.DEQUANT_TILE
types = {"w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8", "hit_ptr": "*i32", "out_ptr": "*bf16"}
done = []
for one_group in (True, False):
    for zeros in (True, False):
        consts = dict(GROUP=128 if one_group else 32, HAS_ZEROS=zeros, HAS_HIT=True,
                      ONE_GROUP=one_group, BLOCK_N=block_n, BLOCK_W=block_w)
        sig = {a: "constexpr" if a in consts else types.get(a, "i32") for a in fn.arg_names}
        src = ASTSource(fn=fn, signature=sig, constexprs=consts)
        asm = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                             options=dict(num_warps=warps)).asm
        done.append([one_group, zeros, "cubin" in asm])
print("RESULT" + json.dumps(done))
"""


def test_dequantize_kernel_compiles_for_sm90():
    """The dequantization kernel at its GPU program shape (``DEQUANT_TILE``), a scale a row
    and a scale an input, zero codes or 8, compiled for an H100 (offline, no GPU): the
    interpreter runs it on the CPU, never the compiler."""
    proc = run_compile_script(_COMPILE_DEQUANT)
    assert proc.returncode == 0 and "RESULT" in proc.stdout, proc.stderr[-3000:]
    done = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert len(done) == 4 and all(ok for *_, ok in done), done
