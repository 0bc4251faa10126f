"""The LoRA shrink/expand Triton kernels (tessellm/kernels/lora/) against the pure-torch
reference, at tiny sizes (Triton's interpreter on the CPU, the GPU when there is one): the
slot grouping of ``prepare``, split-K shrink, strided expand inputs, every float dtype."""

from __future__ import annotations

import pytest
import torch

from tessellm.backends.reference.lora import ReferenceLoRAOps
from tessellm.kernels.lora import TritonLoRAOps, lora_expand, lora_expand_slices, lora_shrink, prepare
from tessellm.kernels.lora.shrink import _split_k

DEV = "cuda" if torch.cuda.is_available() else "cpu"
REF, TRITON = ReferenceLoRAOps(), TritonLoRAOps()


def test_prepare_groups_rows_by_slot_in_blocks():
    slots = torch.tensor([2, -1, 0, 2, 2, 0, -1], dtype=torch.int32, device=DEV)
    meta = prepare(slots, 3)
    m, ids, blocks = meta.block_m, meta.sorted_ids.cpu(), meta.block_slot.cpu()
    used = int(meta.num_padded) // m
    seen = []
    for b in range(used):
        rows = [int(r) for r in ids[b * m:(b + 1) * m] if r < slots.numel()]
        assert all(int(slots[r]) == (int(blocks[b]) if blocks[b] < 3 else -1) for r in rows)
        seen += rows
    assert sorted(seen) == list(range(slots.numel()))  # every row exactly once
    assert all(int(s) == 3 for s in blocks[used:])  # blocks past num_padded are skipped


def _case(t, s, r, k, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    slots = torch.randint(-1, s, (t,), generator=g, dtype=torch.int32)
    x = torch.randn(t, k, generator=g).to(dtype)
    a = (torch.randn(s, r, k, generator=g) / k ** 0.5).to(dtype)
    b = (torch.randn(s, n, r, generator=g) / r ** 0.5).to(dtype)
    scaling = torch.rand(s, generator=g) + 0.5
    return [v.to(DEV) for v in (slots, x, a, b, scaling)]


def _tol(dtype):
    return {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2),
            torch.bfloat16: dict(atol=6e-2, rtol=3e-2)}[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t,k", [(1, 256), (3, 80), (40, 64)])
def test_shrink_and_expand_match_reference(t, k, dtype):
    s, r, n = 5, 8, 48  # rank 8: below the dot's 16-wide tile, masked
    slots, x, a, b, scaling = _case(t, s, r, k, n, dtype, seed=t * 1000 + k)
    meta, ref_meta = TRITON.prepare(slots, s), REF.prepare(slots, s)
    got, want = torch.full((t, r), 3.0, device=DEV), torch.empty(t, r, device=DEV)
    TRITON.shrink(x, a, meta, got)
    REF.shrink(x, a, ref_meta, want)
    torch.testing.assert_close(got, want, **_tol(torch.float32 if dtype == torch.float32 else torch.float16))
    out = torch.randn(t, n + 16, device=DEV).to(dtype)
    y_got, y_want = out.clone(), out.clone()
    TRITON.expand(want, b, meta, scaling, y_got, 16)
    REF.expand(want, b, ref_meta, scaling, y_want, 16)
    torch.testing.assert_close(y_got.float(), y_want.float(), **_tol(dtype))
    assert torch.equal(y_got[slots < 0], out[slots < 0])


def test_split_k_shrink_sums_every_k_chunk():
    """A decode row with K = 8 x the interpreter's K tile: the launch splits K, each part into
    its own plane, summed into out (a strided column slice here, as the stacked q/k/v buffer)."""
    slots, x, a, _, _ = _case(2, 3, 16, 512, 16, torch.float32, seed=7)
    slots = torch.tensor([1, -1], dtype=torch.int32, device=DEV)
    meta = prepare(slots, 3)
    assert _split_k(meta, 512, 1, 32 if DEV == "cpu" else 64) > 1
    stacked = torch.full((2, 48), float("nan"), device=DEV)
    out = stacked[:, 16:32]
    lora_shrink(x, a, meta, out)
    torch.testing.assert_close(out[0], a[1] @ x[0], atol=1e-4, rtol=1e-4)
    assert torch.equal(out[1], torch.zeros(16, device=DEV))
    assert stacked[:, :16].isnan().all() and stacked[:, 32:].isnan().all()


def test_expand_reads_a_strided_column_slice_of_the_shrink_output():
    slots, x, a, b, scaling = _case(6, 2, 16, 64, 32, torch.float32, seed=11)
    stacked = torch.randn(6, 48, device=DEV)  # q/k/v shrink outputs side by side
    out, want = torch.zeros(6, 40, device=DEV), torch.zeros(6, 40, device=DEV)
    lora_expand(stacked[:, 16:32], b, prepare(slots, 2), scaling, out, 8)
    REF.expand(stacked[:, 16:32].contiguous(), b, REF.prepare(slots, 2), scaling, want, 8)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


def test_bad_shapes_say_what_fits():
    slots, x, a, b, scaling = _case(4, 2, 16, 64, 32, torch.float32, seed=1)
    meta = prepare(slots, 2)
    with pytest.raises(ValueError, match="lora_shrink: .* do not fit"):
        lora_shrink(x, a, meta, torch.empty(4, 16, dtype=torch.float16, device=DEV))
    with pytest.raises(ValueError, match="lora_expand: .* out_offset"):
        lora_expand(torch.zeros(4, 16, device=DEV), b, meta, scaling,
                    torch.zeros(4, 40, device=DEV), 16)


def test_expand_slices_one_launch_equals_three_expands():
    """q/k/v of different widths in one launch; tiles never straddle slices."""
    g = torch.Generator().manual_seed(5)
    slots = torch.tensor([0, 2, -1, 1, 0], dtype=torch.int32, device=DEV)
    buf = torch.randn(5, 3 * 16, generator=g).to(DEV)
    bs = [(torch.randn(3, n, 16, generator=g)).to(DEV, torch.float16) for n in (40, 24, 24)]
    scaling = torch.tensor([1.0, 0.5, 2.0], device=DEV)
    out = torch.randn(5, 100, generator=g).to(DEV, torch.float16)
    got, want = out.clone(), out.clone()
    lora_expand_slices(buf, bs, prepare(slots, 3), scaling, got, [4, 44, 68])
    REF.expand_slices(buf, bs, REF.prepare(slots, 3), scaling, want, [4, 44, 68])
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)
    assert torch.equal(got[:, :4], out[:, :4]) and torch.equal(got[:, 92:], out[:, 92:])


_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tessellm.kernels.lora.expand import _expand_kernel
from tessellm.kernels.lora.shrink import _shrink_kernel

def compile(fn, ptrs, consts):
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in fn.arg_names}
    cx = {(fn.arg_names.index(k),): v for k, v in consts.items()}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx),
                          target=GPUTarget("cuda", 90, 32)).asm["ptx"]

idx = {n: "*i32" for n in ("sorted_ids_ptr", "block_slot_ptr", "num_padded_ptr")}
for split in (1, 4):
    compile(_shrink_kernel, {"x_ptr": "*bf16", "a_ptr": "*bf16", "out_ptr": "*fp32", **idx},
            dict(SPLIT_K=split, BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, DOT_PREC="tf32",
                 DOT_FP32=False))
compile(_expand_kernel, {"buf_ptr": "*fp32", "b0_ptr": "*bf16", "b1_ptr": "*bf16",
                         "b2_ptr": "*bf16", "scaling_ptr": "*fp32", "out_ptr": "*bf16", **idx},
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_R=16, DOT_PREC="tf32", DOT_FP32=False))
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_to_sm90_ptx():
    """The interpreter runs what the compiler may refuse (types that differ between branches,
    constexpr misuse): compile both kernels for sm_90 offline, no GPU needed."""
    from tests.kernels.offline_compile import run_compile_script

    proc = run_compile_script(_COMPILE)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
