"""bitsandbytes 4-bit MoE experts in the Triton fused MoE (keyword ``bnb4_code``): the decode
kernels that read the packed codes (``kernels/moe/decode_bnb4.py``) and, beyond them, the
experts dequantized a chunk at a time for the 16-bit grouped GEMMs (``bnb4_dequant.py``).
Against the reference op (``fused_experts_reference``) and a float64 product of the same
dequantized weights: NF4 and FP4 tables, a masked last K step, expert parallelism, float32 and
bf16 activations; the dequantization bit for bit. Triton's interpreter on a CPU (tiny sizes),
the GPU where there is one (also Qwen3-30B-A3B-sized experts)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tessellm.backends.reference.moe import (dequantize_bnb4_experts,  # noqa: E402
                                             fused_experts_reference, route)
from tessellm.kernels.moe import fused_moe, fused_moe_triton  # noqa: E402
from tessellm.kernels.moe import bnb4_dequant as dq  # noqa: E402
from tessellm.kernels.moe.decode_bnb4 import fused_moe_bnb4_decode  # noqa: E402
from tessellm.quantization.bnb import FP4_CODE, NF4_CODE  # noqa: E402
from tests.gpu_set import ON_GPU, gpu_when_present  # noqa: E402

DEV = torch.device("cuda" if ON_GPU else "cpu")
TABLES = {"nf4": NF4_CODE, "fp4": FP4_CODE}


def _experts(e: int, n: int, k: int, seed: int, scale: float = 0.1):
    """Random codes ``[e, n, k/2]`` and absmaxes ``[e, n, k/64]`` (in ``[scale/2, scale]``)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (e, n, k // 2), generator=g, dtype=torch.uint8)
    absmax = torch.rand(e, n, k // 64, generator=g) * scale / 2 + scale / 2
    return codes, absmax


def _float64_product(x, weights, ids, w13, w2, a13, a2, code, expert_map=None):
    """The experts' float64 output on the same dequantized weights (float32 values), the
    activation rounded where the kernels round it: the oracle of the tolerance below."""
    ids = ids if expert_map is None else expert_map[ids.long()]
    d13 = dequantize_bnb4_experts(w13, a13, code, torch.float32).double()
    d2 = dequantize_bnb4_experts(w2, a2, code, torch.float32).double()
    out = torch.zeros(x.shape, dtype=torch.float64)
    inter = d2.shape[2]
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            gu = d13[e] @ x[t].double()
            act = torch.nn.functional.silu(gu[:inter]) * gu[inter:]
            out[t] += float(weights[t, j]) * (d2[e] @ act.to(x.dtype).double())
    return out


@pytest.mark.parametrize("table", ["nf4", "fp4"])
@gpu_when_present
def test_dequantize_equals_reference(table):
    """float32 bit for bit (experts 1..2 of 3, a row of 3 blocks: a masked last program);
    ``hit`` 0 leaves an expert unwritten."""
    code = torch.tensor(TABLES[table])
    w, a = _experts(3, 24, 192, seed=1)
    got = dq.dequantize_bnb4_experts(w.to(DEV), a.to(DEV), code.to(DEV), torch.float32, 1, 3)
    assert torch.equal(got.cpu(), dequantize_bnb4_experts(w[1:], a[1:], code, torch.float32))
    hit = torch.tensor([1, 0, 1, 0], dtype=torch.int32, device=DEV)
    got = dq.dequantize_bnb4_experts(w.to(DEV), a.to(DEV), code.to(DEV), torch.float32, 0, 3, hit)
    assert torch.equal(got[2].cpu(), dequantize_bnb4_experts(w[2], a[2], code, torch.float32))


@pytest.mark.parametrize("tokens, inter, table, dtype", [
    (1, 64, "nf4", torch.float32),     # one block a down row
    (3, 192, "fp4", torch.float32),    # 3 blocks a down row: a masked last K step
    (2, 128, "nf4", torch.bfloat16)])
@gpu_when_present
def test_decode_kernels_match_reference(tokens, inter, table, dtype):
    """The decode kernels (codes looked up in the table, a block's products scaled once):
    within float32 reassociation of the float64 product (float32), bf16 rounding of the
    weights (bf16); ``fused_moe_triton`` at decode sizes is this path, ``fused_moe`` routes
    first; other ranks' experts (``expert_map``) contribute nothing."""
    e, h = 8, 128
    code = torch.tensor(TABLES[table])
    w13, a13 = _experts(e, 2 * inter, h, seed=tokens)
    w2, a2 = _experts(e, h, inter, seed=tokens + 1)
    g = torch.Generator().manual_seed(tokens + 2)
    x = torch.randn(tokens, h, generator=g).to(dtype)
    logits = torch.randn(tokens, e, generator=g)
    weights, ids = route(logits, 2)
    exact = _float64_product(x, weights, ids, w13, w2, a13, a2, code)
    want = fused_experts_reference(x, weights, ids, w13, w2, a13, a2, bnb4_code=code)
    to = (lambda t: t.to(DEV))  # noqa: E731
    experts = [to(t) for t in (w13, w2, a13, a2)]
    ids32 = to(ids.to(torch.int32))
    got = fused_moe_bnb4_decode(to(x), to(weights), ids32, *experts, to(code))
    if dtype == torch.float32:
        torch.testing.assert_close(got.cpu().double(), exact, rtol=1e-5, atol=1e-5)
        tol = dict(rtol=1e-4, atol=1e-4)
    else:
        tol = dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.cpu(), want, **tol)
    assert torch.equal(fused_moe_triton(to(x), to(weights), ids32, *experts,
                                        bnb4_code=to(code)), got)
    routed = fused_moe(to(x), to(logits), *experts[:2], 2, "softmax", True, *experts[2:],
                       bnb4_code=to(code))
    torch.testing.assert_close(routed.cpu(), want, **tol)
    expert_map = torch.tensor([-1, -1, -1, -1, 0, 1, 2, 3], dtype=torch.int32)  # 4..7 here
    local = [t[4:] for t in (w13, w2, a13, a2)]
    want = fused_experts_reference(x, weights, ids, *local, bnb4_code=code, expert_map=expert_map)
    got = fused_moe_triton(to(x), to(weights), ids32, *[to(t) for t in local], bnb4_code=to(code),
                           expert_map=to(expert_map))
    torch.testing.assert_close(got.cpu(), want, **tol)


@pytest.mark.parametrize("budget_mb, expert_map", [(None, False), (0.05, True)])
@gpu_when_present
def test_dequant_path_matches_reference(budget_mb, expert_map, monkeypatch):
    """Beyond the decode kernels' tokens (``TESSELLM_MOE_BNB4_DECODE_TOKENS`` 2 here) the
    routed experts are dequantized (one chunk of all, or one expert a chunk with a 0.05 MB
    budget) for the 16-bit grouped GEMMs: float32 equal to the reference to reassociation,
    with expert parallelism too."""
    from tessellm.kernels.moe import int4_dequant

    monkeypatch.setenv("TESSELLM_MOE_BNB4_DECODE_TOKENS", "2")
    if budget_mb is not None:
        monkeypatch.setattr(int4_dequant, "MOE_INT4_DEQUANT_WORKSPACE_MB", budget_mb)
    e, h, inter = 4, 128, 64
    code = torch.tensor(NF4_CODE)
    w13, a13 = _experts(e, 2 * inter, h, seed=7)
    w2, a2 = _experts(e, h, inter, seed=8)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(9, h, generator=g)
    emap = torch.tensor([0, 1, 2, 3, -1, -1], dtype=torch.int32) if expert_map else None
    weights, ids = route(torch.randn(9, e if emap is None else 6, generator=g), 2)
    want = fused_experts_reference(x, weights, ids, w13, w2, a13, a2, bnb4_code=code,
                                   expert_map=emap)
    got = fused_moe_triton(*(t.to(DEV) for t in (x, weights, ids.to(torch.int32), w13, w2, a13,
                                                 a2)),
                           bnb4_code=code.to(DEV), expert_map=None if emap is None else emap.to(DEV))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


def test_bnb4_code_with_another_quantization_is_refused():
    """bnb4 codes with ``int4`` (or fp8 blocks) at once, or rows that are not whole blocks of
    a power-of-two size: one sentence naming the problem."""
    w13, a13 = _experts(2, 128, 64, seed=0)
    w2, a2 = _experts(2, 64, 64, seed=1)
    weights, ids = route(torch.randn(1, 2), 1)
    with pytest.raises(ValueError, match="bnb4_code.*does not combine with int4"):
        fused_moe_triton(torch.randn(1, 64), weights, ids.int(), w13, w2, a13, a2,
                         bnb4_code=torch.tensor(NF4_CODE), int4=True)
    with pytest.raises(ValueError, match="w2's bnb4 rows of 64 inputs with 3 absmaxes"):
        fused_moe_triton(torch.randn(1, 64), weights, ids.int(), w13, w2, a13,
                         torch.ones(2, 64, 3), bnb4_code=torch.tensor(NF4_CODE))
    # dense w2, a table that is not 16 entries, absmaxes of other rows: refused, never read
    code = torch.tensor(NF4_CODE)
    for bad in (dict(w2=w2.float()), dict(bnb4_code=code[:8]), dict(w2_scale=a2[:, :32]),
                dict(w13_scale=a13[:1])):
        args = {**dict(w13=w13, w2=w2, w13_scale=a13, w2_scale=a2, bnb4_code=code), **bad}
        with pytest.raises(ValueError, match="bnb4_code .the 16-entry NF4 / FP4 table. needs uint8"):
            fused_moe_triton(torch.randn(1, 64), weights, ids.int(), **args)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [1, 4, 64])
def test_qwen3_30b_a3b_sized_experts_on_a_gpu(tokens):
    """Qwen3-30B-A3B's expert shapes (128 experts, H 2048, I 768, top 8) in bf16: the decode
    kernels (1, 4 tokens) and the dequantized path (64) against the reference."""
    e, h, inter, k = 128, 2048, 768, 8
    code = torch.tensor(NF4_CODE)
    w13, a13 = _experts(e, 2 * inter, h, seed=3, scale=0.05)
    w2, a2 = _experts(e, h, inter, seed=4, scale=0.05)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(tokens, h, generator=g).bfloat16()
    weights, ids = route(torch.randn(tokens, e, generator=g), k)
    want = fused_experts_reference(*(t.cuda() for t in (x, weights, ids, w13, w2, a13, a2)),
                                   bnb4_code=code.cuda())
    got = fused_moe_triton(*(t.cuda() for t in (x, weights, ids.to(torch.int32), w13, w2, a13,
                                                a2)), bnb4_code=code.cuda())
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)


_COMPILE = """
import json
from tessellm.kernels.moe import bnb4_dequant as dq, decode_bnb4 as db
from tests.kernels.offline_compile import compile_sm90_ptx

ptrs = {"x_ptr": "*bf16", "ids_ptr": "*i32", "w_ptr": "*u8", "a_ptr": "*fp32",
        "code_ptr": "*fp32", "act_ptr": "*bf16", "weights_ptr": "*fp32", "out_ptr": "*bf16",
        "hit_ptr": "*i32"}
done = []
for inter in (768, 1536):  # Qwen3-30B-A3B's (12 blocks a down row: masked), Qwen1.5-MoE's
    up, down = db.BNB4_DECODE_ROWS
    for fn, k, rows in ((db._moe_up_bnb4_kernel, 2048, up), (db._moe_down_bnb4_kernel, inter,
                                                                down)):
        tiles = db._tiles(k, 64, False, rows)
        warps = tiles.pop("num_warps")
        ptx = compile_sm90_ptx(fn, ptrs, dict(tiles, TOP_K=8, USE_PDL=True), warps)
        done.append([fn.__name__, inter, "griddepcontrol" in ptx])
block_n, nb, warps = dq.DEQUANT_TILE
ptx = compile_sm90_ptx(dq._dequant_bnb4_kernel, ptrs,
                       dict(BS=64, HAS_HIT=True, BLOCK_N=block_n, NB=nb), warps)
done.append(["dequant", 0, "st.global" in ptx])
print("RESULT" + json.dumps(done))
"""


def test_kernels_compile_for_sm90():
    """The decode kernels at their GPU tiles (Qwen3-30B-A3B's shapes, PDL on) and the
    dequantization kernel, compiled for an H100 (offline, no GPU): the interpreter runs them on
    the CPU, never the compiler."""
    import json

    from tests.kernels.offline_compile import run_compile_script

    proc = run_compile_script(_COMPILE)
    assert proc.returncode == 0 and "RESULT" in proc.stdout, proc.stderr[-3000:]
    done = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert len(done) == 5 and all(ok for *_, ok in done), done
