"""The MoE expert LoRA Triton path (``kernels/lora/moe.py``) against the pure-torch reference
(``backends/reference/moe_lora.py``) at tiny sizes (Triton's interpreter on the CPU, the GPU
when there is one): mixed slots, zero-padded ranks, odd widths, a gpt-oss-style activation
with biases, expert parallelism; and both kernels compiled for sm_90 offline (slow)."""

from __future__ import annotations

import pytest
import torch

from tessellm.backends.reference.moe import ExpertActivation, route
from tessellm.backends.reference.moe_lora import fused_experts_lora_reference
from tessellm.backends.spec import ExpertLoRA
from tessellm.kernels.lora.moe import fused_experts_lora_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _case(t, e, h, inter, slots, rank, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, d=1.0: (torch.randn(*s, generator=g) / d).to(dtype).to(DEV)  # noqa: E731
    lora = ExpertLoRA(r(slots, e, 2 * rank, h, d=h ** 0.5), r(slots, e, 2 * inter, rank, d=2),
                      r(slots, e, rank, inter, d=inter ** 0.5), r(slots, e, h, rank, d=2),
                      (torch.rand(slots, generator=g) + 0.5).to(DEV))
    lora.w13_a[:, :, rank - 3:rank] = 0  # slot ranks zero-padded
    weights, ids = route(torch.randn(t, e, generator=g), 2)
    token_slots = torch.randint(-1, slots, (t,), generator=g, dtype=torch.int32)
    return (r(t, h), weights.to(DEV), ids.to(DEV), r(e, 2 * inter, h, d=h ** 0.5),
            r(e, h, inter, d=inter ** 0.5), token_slots.to(DEV), lora)


@pytest.mark.parametrize("t,h,inter", [(1, 64, 32), (9, 48, 40), (33, 32, 24)])
def test_triton_matches_reference(t, h, inter):
    args = _case(t, 6, h, inter, 3, 16, seed=t)
    got = fused_experts_lora_triton(*args)
    want = fused_experts_lora_reference(*args)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_triton_clamped_swiglu_with_biases_and_bf16():
    act = ExpertActivation("swiglu_oai", alpha=1.702, limit=7.0)
    args = _case(7, 4, 32, 32, 2, 16, seed=3)
    g = torch.Generator().manual_seed(5)
    bias = dict(w13_bias=torch.randn(4, 64, generator=g).to(DEV),
                w2_bias=torch.randn(4, 32, generator=g).to(DEV))
    torch.testing.assert_close(fused_experts_lora_triton(*args, activation=act, **bias),
                               fused_experts_lora_reference(*args, activation=act, **bias),
                               atol=1e-4, rtol=1e-4)
    low = _case(7, 4, 32, 32, 2, 16, seed=4, dtype=torch.bfloat16)
    torch.testing.assert_close(fused_experts_lora_triton(*low).float(),
                               fused_experts_lora_reference(*low).float(), atol=5e-2, rtol=5e-2)


def test_triton_expert_map_skips_other_ranks_experts():
    hidden, weights, ids, w13, w2, slots, lora = _case(11, 6, 32, 16, 3, 16, seed=9)
    expert_map = torch.tensor([-1, -1, -1, 0, 1, 2], dtype=torch.int32, device=DEV)
    part = ExpertLoRA(*(getattr(lora, f)[:, 3:].contiguous() for f in ("w13_a", "w13_b", "w2_a",
                                                                      "w2_b")), lora.scaling)
    args = (hidden, weights, ids, w13[3:], w2[3:], slots, part)
    torch.testing.assert_close(fused_experts_lora_triton(*args, expert_map=expert_map),
                               fused_experts_lora_reference(*args, expert_map=expert_map),
                               atol=1e-4, rtol=1e-4)


def test_triton_tiles_read_pairs_per_global_expert_with_expert_parallelism(monkeypatch):
    """As the base grouped GEMMs (``fused_moe._grouped_tiles``): the tile rule gets the
    step's pairs over the 6 global experts, not over this rank's 3."""
    import tessellm.kernels.lora.moe as lm

    hidden, weights, ids, w13, w2, slots, lora = _case(11, 6, 32, 16, 3, 16, seed=9)
    expert_map = torch.tensor([-1, -1, -1, 0, 1, 2], dtype=torch.int32, device=DEV)
    part = ExpertLoRA(*(getattr(lora, f)[:, 3:].contiguous() for f in ("w13_a", "w13_b", "w2_a",
                                                                      "w2_b")), lora.scaling)
    seen, rule = [], lm._tiles
    monkeypatch.setattr(lm, "_tiles", lambda pairs, experts, *a: seen.append((pairs, experts))
                        or rule(pairs, experts, *a))
    fused_experts_lora_triton(hidden, weights, ids, w13[3:], w2[3:], slots, part,
                              expert_map=expert_map)
    assert seen == [(22, 6)]


_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tessellm.kernels.lora.moe import _moe_lora_expand_kernel, _moe_lora_shrink_kernel

def compile(fn, ptrs, consts):
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in fn.arg_names}
    cx = {(fn.arg_names.index(k),): v for k, v in consts.items()}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx),
                          target=GPUTarget("cuda", 90, 32)).asm["ptx"]

idx = {n: "*i32" for n in ("sorted_ids_ptr", "block_group_ptr", "num_padded_ptr")}
for dt, prec, f32 in (("bf16", "tf32", False), ("fp32", "ieee", True)):
    compile(_moe_lora_shrink_kernel, {"x_ptr": f"*{dt}", "a_ptr": f"*{dt}", "out_ptr": "*fp32",
                                      **idx},
            dict(A_ROW_DIV=8, BLOCK_M=16, BLOCK_R=32, BLOCK_K=64, DOT_PREC=prec, DOT_FP32=f32))
    compile(_moe_lora_expand_kernel, {"buf_ptr": "*fp32", "b_ptr": f"*{dt}",
                                      "scaling_ptr": "*fp32", "out_ptr": f"*{dt}", **idx},
            dict(PARTS=2, BLOCK_M=16, BLOCK_N=64, BLOCK_R=16, DOT_PREC=prec, DOT_FP32=f32))
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_to_sm90_ptx():
    from tests.kernels.offline_compile import run_compile_script

    proc = run_compile_script(_COMPILE)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
