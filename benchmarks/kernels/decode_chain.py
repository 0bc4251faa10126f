"""Batch-1 decode as the engine's graph runs it, kernel by kernel (GPU only): 32 Llama-3.1-8B
layers of add-RMSNorm, qkv GEMV, cache write + split-KV decode attention (768-token context),
o GEMV, add-RMSNorm, gate_up GEMV, SiLU-and-mul, down GEMV, then the LM head, captured in one
CUDA graph with programmatic dependent launch (``graph_scope``), weights bf16 or e4m3 (W8A16,
``gemv_fp8_x2``). Each layer has its own weights (16 GB bf16), so nothing stays in the L2.

    python3 benchmarks/kernels/decode_chain.py --out DIR [--sections chain attn_long]

chain: GPU ms per step, against the weight-read floor at 4.25 TB/s, of the whole chain and of
the chain without one kind of kernel (``-attn``: cache write and decode attention; ``-norm``:
both add-RMSNorms; ``-silu``: SiLU-and-mul; ``gemv``: the GEMVs alone), with PDL, and of the
whole chain without PDL: the differences are what each kind costs a step; then the whole
chain with other split-KV settings of the attention (``ATTN_VARIANTS``). ``silu fold``: the
whole chain with SiLU-and-mul in the gate_up GEMV's epilogue (``gemv_silu_and_mul``,
``gemv_fp8_x2_silu_and_mul``), as the engine runs its MLP at 1-2 rows.
The bf16 chain also runs with the two add-RMSNorms folded into the qkv and gate_up GEMVs
(``fold ...``: ``gemv_norm.py`` at several launch shapes; ``--fold``: bf16 only, these and the
kinds above; the engine keeps the norms unfused: the fold measured slower).
b1fp8: the chain with the SiLU fold (the engine's default) against the same with the decode
attention's last-split reduce, the LM head in e4m3 (fp8 only) and both (session 17).
prewait: the engine's chain (SiLU fold; fp8 with its e4m3 LM head, TESSELLM_FP8_LM_HEAD) with
the one-row GEMVs reading weights before their PDL wait (``gemv.Prewait``,
TESSELLM_GEMV_PREWAIT) at several settings against none, each checked bitwise against none;
and the GEMVs alone (no attention, norms: GEMV after GEMV) off and at two settings.
b1fuse: the engine's chain against the add-RMSNorm in the o (and down) GEMVs' last program
(``gemm/norm_epilogue.py``, TESSELLM_GEMV_NORM_EPILOGUE), with and without the last-split
reduce, and without the norms at all (what they cost).
splitlast: the engine's chain (as in prewait, default prewait) with the one-row GEMVs' split K
combined in the launch (``gemm/split_last.py``, TESSELLM_GEMV_SPLIT_LAST: the shapes of
``SPLIT_TABLE`` / ``BF16_SPLIT_TABLE``, and ``PREWAIT_TILES``' per-shape prewait) off, on, on
with the split only, on with the prewait table only, off again, then the GEMVs alone off and on.
b1norm2: the engine's chain against the add-RMSNorms split between the GEMVs around them
(``gemm/norm_fold.py``, TESSELLM_NORM_FOLD2), and without the norms at all.
attn_long: the split-KV decode kernel at workload L's contexts (1024-2048 keys) at batches
256 and 512 and workload F's (512-768) at 256, in GB/s of K/V read, by splits.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_timing import graph_ms, run_sections  # noqa: E402

HID, INTER, LAYERS, VOCAB = 4096, 14336, 32, 128256


def _weights(fp8: bool):
    from tessellm.quantization.packed import quantize_fp8

    shapes = {"qkv": (6144, HID), "o": (HID, HID), "gate_up": (2 * INTER, HID),
              "down": (HID, INTER)}
    layers = []
    for _ in range(LAYERS):
        w = {}
        for name, (n, k) in shapes.items():
            t = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            w[name] = quantize_fp8(t) if fp8 else t
            del t
        layers.append(w)
    head = torch.randn(VOCAB, HID, device="cuda", dtype=torch.bfloat16) * 0.02
    nbytes = sum((q.qweight if fp8 else q).numel() * (1 if fp8 else 2)
                 for w in layers for q in w.values()) + head.numel() * 2
    return layers, head, nbytes


def _step_fn(layers, head, fp8: bool, parts=("attn", "norm", "silu"), attn_attrs=None,
             fold=None, head8=None, refine=16, norm_epi=(), fold2=False):
    """``fold``: a ``GemvConfig``; the two add-RMSNorms of a layer folded into the qkv and
    gate_up GEMVs at that launch shape (``gemv_norm.py``, bf16 only), as the engine runs them.
    ``head8``: the LM head as an ``Fp8Weight`` (TESSELLM_FP8_LM_HEAD), as the engine runs it
    (``fp8_head_mm``: ``gemv_fp8_x2``, then the ``refine`` largest logits recomputed from
    ``head``; 0: not). ``norm_epi``: the GEMVs ("o", "down") that run the add-RMSNorm after
    them in their last program (``gemm/norm_epilogue.py``; both are what the engine runs under
    TESSELLM_GEMV_NORM_EPILOGUE=1: "down" runs the next layer's input norm or the final
    one). ``fold2``: the norms split between the GEMVs around them (``gemm/norm_fold.py``,
    TESSELLM_NORM_FOLD2=1, with the SiLU fold): o -> gate_up and down -> the next qkv; the
    first input norm and the final norm stay launches, as in the engine."""
    from bench_attention import BS, DTYPE, KVH, MAX_MODEL_LEN, D, H, make_batch

    from tessellm.backends.spec import AttentionSpec
    from tessellm.kernels.attention import TritonAttentionKernel
    from tessellm.kernels.fused_ops import TritonOps
    from tessellm.kernels.gemm.gemv import gemv, gemv_silu_and_mul, gemv_then_add_rms_norm
    from tessellm.kernels.gemm.gemv_norm import gemv_add_rms_norm
    from tessellm.kernels.gemm.gemv_x2 import (gemv_fp8_x2, gemv_fp8_x2_silu_and_mul,
                                               gemv_fp8_x2_then_add_rms_norm)

    ops = TritonOps()
    if head8 is not None:
        import torch.nn.functional as F

        from tessellm.kernels.gemm.quant_ops import TritonQuantOps
        from tessellm.loader.model_loader import fp8_head_mm

        head8_mm = fp8_head_mm(TritonQuantOps(), head, F.linear, refine)
    gen = torch.Generator().manual_seed(0)
    _, _, _, kc, vc, batch = make_batch([1], [768], gen)
    kernel = TritonAttentionKernel(AttentionSpec(H, KVH, D, DTYPE, BS), MAX_MODEL_LEN,
                                   max_num_seqs=1)
    for name, value in (attn_attrs or {}).items():  # split-KV knobs (chain_section)
        setattr(kernel, name, value)
    md = kernel.build_metadata(batch)
    # the engine's call: unrotated q, k with positions and the cos/sin table (fuses_rotary)
    positions = (batch.seq_lens[:1] - 1).long()
    freqs = torch.outer(torch.arange(MAX_MODEL_LEN, dtype=torch.float32),
                        1.0 / 500000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1).cuda()
    norm_w = torch.ones(HID, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, HID, device="cuda", dtype=torch.bfloat16)
    res = torch.zeros_like(x)

    def lin(a, w):
        return gemv_fp8_x2(a, w.qweight, w.scales) if fp8 else gemv(a, w)

    def silu_lin(a, w):  # gate_up with SiLU-and-mul in the GEMV's epilogue
        if fp8:
            return gemv_fp8_x2_silu_and_mul(a, w.qweight, w.scales)
        return gemv_silu_and_mul(a, w)

    def norm(h):
        return ops.fused_add_rms_norm(h, res, norm_w, 1e-5)[0] if "norm" in parts else h

    def lin_norm(a, w, site):  # the GEMV; the norm after it in its last program where asked
        if site not in norm_epi:
            return lin(a, w), False
        if fp8:
            return gemv_fp8_x2_then_add_rms_norm(a, w.qweight, w.scales, res, norm_w, 1e-5)[0], True
        return gemv_then_add_rms_norm(a, w, res, norm_w, 1e-5)[0], True

    def norm_lin(h, w):
        if fold is not None:
            return gemv_add_rms_norm(h, res, norm_w, 1e-5, w, config=fold)[0]
        return lin(norm(h), w)

    from tessellm.kernels.gemm.gemv_fold import (gemv_add_rms_norm_fold,
                                                 gemv_fp8_x2_add_rms_norm_fold,
                                                 gemv_fp8_x2_rms_scaled, gemv_rms_scaled)

    def fold_out(a, w):  # the producer: (xg, sumsq), res updated in place
        if fp8:
            return gemv_fp8_x2_add_rms_norm_fold(a, w.qweight, w.scales, res, norm_w)
        return gemv_add_rms_norm_fold(a, w, res, norm_w)

    def fold_in(f, w, silu=False):  # the consumer of a producer's (xg, sumsq)
        if fp8:
            return gemv_fp8_x2_rms_scaled(f[0], w.qweight, w.scales, f[1], 1e-5,
                                          silu_and_mul=silu)
        return gemv_rms_scaled(f[0], w, f[1], 1e-5, silu_and_mul=silu)

    def step_fold2():
        h, f = x, None
        for i, w in enumerate(layers):
            qkv = lin(norm(h), w["qkv"]) if f is None else fold_in(f, w["qkv"])
            q = qkv[:, :H * D].view(1, H, D)
            k = qkv[:, H * D:(H + KVH) * D].view(1, KVH, D)
            v = qkv[:, (H + KVH) * D:].view(1, KVH, D)
            o = kernel.forward(q, k, v, kc, vc, md, D ** -0.5, positions=positions,
                               cos_sin_cache=cos_sin).view(1, H * D)
            act = fold_in(fold_out(o, w["o"]), w["gate_up"], silu=True)
            if i + 1 < len(layers):
                f = fold_out(act, w["down"])
            else:
                h, f = lin(act, w["down"]), None
        h = norm(h)
        if head8 is not None:
            return head8_mm(h, head8)
        return gemv(h, head)

    if fold2:
        return step_fold2

    def step():
        h, normed = x, False
        for w in layers:
            qkv = lin(h, w["qkv"]) if normed else norm_lin(h, w["qkv"])
            o = qkv[:, :H * D]
            if "attn" in parts:
                q = qkv[:, :H * D].view(1, H, D)
                k = qkv[:, H * D:(H + KVH) * D].view(1, KVH, D)
                v = qkv[:, (H + KVH) * D:].view(1, KVH, D)
                o = kernel.forward(q, k, v, kc, vc, md, D ** -0.5, positions=positions,
                                   cos_sin_cache=cos_sin).view(1, H * D)
            h, normed = lin_norm(o, w["o"], "o")
            if "silufold" in parts:  # the engine's MLP at 1-2 rows: one launch
                act = silu_lin(h if normed else norm(h), w["gate_up"])
            else:
                gu = lin(h, w["gate_up"]) if normed else norm_lin(h, w["gate_up"])
                act = ops.silu_and_mul(gu) if "silu" in parts else gu[:, :INTER]
            h, normed = lin_norm(act, w["down"], "down")
        if not normed:
            h = norm(h)
        if head8 is not None:  # the engine's form: the e4m3 GEMV, its top 16 refined
            return head8_mm(h, head8)
        return gemv(h, head)

    return step


VARIANTS = {"full": ("attn", "norm", "silu"), "-attn": ("norm", "silu"),
            "-norm": ("attn", "silu"), "-silu": ("attn", "norm"), "gemv": (),
            "silu fold": ("attn", "norm", "silufold")}
QUICK_VARIANTS = ("full", "-attn", "gemv", "silu fold")  # --quick
# The whole chain with other settings of the batch-1 decode attention (default: at most 16
# splits of at least ``small_batch_min_partition`` (64) keys, first tile prefetched before the
# PDL wait, rotary + cache write in the split kernel): what the attention block costs each way.
ATTN_VARIANTS = {"attn unfused (3 launches, no prefetch)": {"prefetch_max_decodes": 0,
                                                            "fuse_rotary_max_decodes": 0},
                 "attn unfused, 16 splits >= 64 keys": {
                     "prefetch_max_decodes": 0, "fuse_rotary_max_decodes": 0,
                     "min_partition": 64, "target_programs": 128},
                 "attn prefetch, rotary kernel": {"fuse_rotary_max_decodes": 0},
                 "attn fused rotary, no prefetch": {"prefetch_max_decodes": 0,
                                                    "min_partition": 64, "target_programs": 128},
                 "attn 32 splits >= 64 keys": {"small_batch_max_splits": 32},
                 "attn 32 splits >= 128 keys": {"small_batch_max_splits": 32,
                                                "small_batch_min_partition": 128},
                 "attn 8 splits": {"small_batch_max_splits": 8},
                 "attn 4 splits": {"small_batch_max_splits": 4}}
QUICK = False
FOLD_ONLY = False  # --fold: bf16 only, the split-KV variants left out
WRITE_DEFAULT = False  # --write-default: the fastest fold shape into gemv_norm.py


def _fold_variants() -> dict:
    """bf16: the chain with the norms folded into the GEMVs (``gemv_norm.py``) at the default
    launch shape and at others; the engine's is NORM_GEMV_CONFIG."""
    from tessellm.kernels.gemm.gemv_norm import NORM_GEMV_CONFIG, NormGemvConfig

    out = {"fold (default)": NORM_GEMV_CONFIG}
    for bn, bk, warps, pre, regs in FOLD_SHAPES:
        out[f"fold bn{bn} bk{bk} w{warps}{' pre' if pre else ''}{f' r{regs}' if regs else ''}"] = \
            NormGemvConfig(block_n=bn, block_k=bk, num_warps=warps, prefetch=pre, maxnreg=regs)
    return out


# (block_n, block_k, warps, prefetch, maxnreg) of the fold's other launch shapes
FOLD_SHAPES = ((2, 1024, 4, True, None), (2, 1024, 4, False, 32), (2, 1024, 4, True, 40),
               (2, 1024, 4, True, 32),
               (4, 1024, 4, False, None), (4, 1024, 4, True, None), (4, 512, 4, True, None),
               (8, 512, 4, False, None), (8, 512, 4, True, None), (2, 512, 4, False, None),
               (1, 1024, 4, True, None))


def _write_default(folds: dict, res: dict) -> str:
    """``--write-default``: the fastest fold launch shape becomes ``NORM_GEMV_CONFIG`` in this
    tree's ``gemv_norm.py`` when it beats the default by >= 0.5% of the chain (the same shape
    timed twice differs by ~0.3%); returns what it wrote."""
    best = min(folds, key=lambda name: res[name])
    if res[best] > res["fold (default)"] * 0.995:
        return "kept: " + repr(folds["fold (default)"])
    path = Path(__file__).resolve().parents[2] / "tessellm/kernels/gemm/gemv_norm.py"
    text = path.read_text()
    start = text.index("NORM_GEMV_CONFIG = ")
    end = text.index("\n", start)
    path.write_text(text[:start] + "NORM_GEMV_CONFIG = " + repr(folds[best]) + text[end:])
    return repr(folds[best])


def chain_section(out: dict) -> None:
    from tessellm.kernels.pdl import graph_scope

    for fp8 in (False,) if FOLD_ONLY else (False, True):
        layers, head, nbytes = _weights(fp8)
        res = {"weight_gb": round(nbytes / 1e9, 3),
               "floor_ms_4.25TBs": round(nbytes / 4.25e9, 3)}
        for name, parts in VARIANTS.items():
            if (QUICK and name not in QUICK_VARIANTS) or (FOLD_ONLY and name == "-silu"):
                continue
            step = _step_fn(layers, head, fp8, parts)
            with graph_scope():
                res[name] = round(graph_ms(step, 3), 4)
        folds = {} if fp8 else _fold_variants()
        for name, cfg in folds.items():
            step = _step_fn(layers, head, fp8, fold=cfg)
            with graph_scope():
                res[name] = round(graph_ms(step, 3), 4)
        if folds and WRITE_DEFAULT:
            res["fold default written"] = _write_default(folds, res)
        for name, attrs in ({} if FOLD_ONLY else ATTN_VARIANTS).items():
            step = _step_fn(layers, head, fp8, attn_attrs=attrs)
            with graph_scope():
                res[name] = round(graph_ms(step, 3), 4)
        if not FOLD_ONLY:
            res["full, no PDL"] = round(graph_ms(_step_fn(layers, head, fp8), 3), 4)
        out["fp8" if fp8 else "bf16"] = res
        print("chain", "fp8" if fp8 else "bf16", json.dumps(res), flush=True)
        del layers, head
        torch.cuda.empty_cache()


def b1fp8_section(out: dict) -> None:
    """Session 17's two opt-in paths on the engine's chain (SiLU fold on, as the engine's
    default): fp8 with the last-split reduce (``last_reduce_max_decodes``), with the LM head in
    e4m3, both; bf16 with the reduce; each base timed again last (the spread)."""
    from tessellm.kernels.pdl import graph_scope
    from tessellm.quantization.packed import quantize_fp8

    last = {"last_reduce_max_decodes": 16}
    parts = VARIANTS["silu fold"]
    for fp8 in (True, False):
        layers, head, nbytes = _weights(fp8)
        head8 = quantize_fp8(head) if fp8 else None
        res = {"weight_gb": round(nbytes / 1e9, 3),
               "floor_ms_4.25TBs": round(nbytes / 4.25e9, 3)}
        runs = {"base (silu fold)": {}, "last reduce": dict(attn_attrs=last)}
        if fp8:
            res["floor_ms_fp8_head"] = round((nbytes - head.numel()) / 4.25e9, 3)
            runs.update({"fp8 head": dict(head8=head8),
                         "fp8 head, no top-16 refinement": dict(head8=head8, refine=0),
                         "fp8 head + last reduce": dict(head8=head8, attn_attrs=last)})
        runs["base again"] = {}
        for name, kw in runs.items():
            step = _step_fn(layers, head, fp8, parts, **kw)
            with graph_scope():
                res[name] = round(graph_ms(step, 3), 4)
        out["fp8" if fp8 else "bf16"] = res
        print("b1fp8", "fp8" if fp8 else "bf16", json.dumps(res), flush=True)
        del layers, head, head8
        torch.cuda.empty_cache()


# TESSELLM_GEMV_PREWAIT settings the prewait section times (``envs.gemv_prewait``'s grammar);
# "0" first and last (the spread), "l2" needs sm90 and PDL
# (4 tiles left out: 48-60 registers, a third fewer programs an SM; each setting compiles 2-4
# kernels on a fresh machine)
PREWAIT_FP8 = ("0", "1", "1+s", "2", "2+s", "s", "l2", "1+l2+s", "2+l2+s", "0")
PREWAIT_BF16 = ("0", "1", "2", "l2", "1+l2", "2+l2", "0")
PREWAIT_GEMV_ONLY = ("0", "1+s", "2+l2+s")


def _prewait(value: str):
    import os

    from tessellm import envs
    from tessellm.kernels.gemm import gemv as gv

    old = os.environ.get("TESSELLM_GEMV_PREWAIT")
    os.environ["TESSELLM_GEMV_PREWAIT"] = value
    try:
        gv.PREWAIT = gv.Prewait(*envs.gemv_prewait())
    finally:
        if old is None:
            del os.environ["TESSELLM_GEMV_PREWAIT"]
        else:
            os.environ["TESSELLM_GEMV_PREWAIT"] = old


def prewait_section(out: dict) -> None:
    """The chain (engine form) at each ``PREWAIT_*`` setting: GPU ms a token, change against
    the first "0", whether the logits equal those of "0" bitwise; then the GEMVs alone
    ("gemv-<setting>"). Printed as ``prewait <dtype> <setting> <json>`` (no spaces inside the
    setting: ``b1pre_device.sh`` reads these lines)."""
    from tessellm.kernels.pdl import graph_scope
    from tessellm.quantization.packed import quantize_fp8

    parts = VARIANTS["silu fold"]
    for fp8 in (True, False):
        layers, head, nbytes = _weights(fp8)
        head8 = quantize_fp8(head) if fp8 else None
        res = {"weight_gb": round(nbytes / 1e9, 3), "runs": {}}
        ref = None
        dtype = "fp8" if fp8 else "bf16"
        for value in PREWAIT_FP8 if fp8 else PREWAIT_BF16:
            name = value if value not in res["runs"] else value + "-again"
            try:  # one setting that fails to compile or run leaves the others
                _prewait(value)
                step = _step_fn(layers, head, fp8, parts, head8=head8)
                with graph_scope():
                    logits = step().clone()
                    ms = round(graph_ms(step, 3), 4)
            except Exception as e:  # noqa: BLE001
                print("prewait-error", dtype, name, f"{type(e).__name__}: {e}"[:300], flush=True)
                continue
            if ref is None:
                ref = logits
            res["runs"][name] = {"ms": ms, "bitwise": bool(torch.equal(logits, ref))}
            print("prewait", dtype, name, json.dumps(res["runs"][name]), flush=True)
        for value in PREWAIT_GEMV_ONLY:
            try:
                _prewait(value)
                step = _step_fn(layers, head, fp8, VARIANTS["gemv"], head8=head8)
                with graph_scope():
                    res["runs"]["gemv-" + value] = {"ms": round(graph_ms(step, 3), 4)}
            except Exception as e:  # noqa: BLE001
                print("prewait-error", dtype, "gemv-" + value, f"{type(e).__name__}: {e}"[:300],
                      flush=True)
                continue
            print("prewait", dtype, "gemv-" + value, json.dumps(res["runs"]["gemv-" + value]),
                  flush=True)
        _prewait("0")
        out["fp8" if fp8 else "bf16"] = res
        del layers, head, head8
        torch.cuda.empty_cache()


def splitlast_section(out: dict) -> None:
    """The chain (engine form) with ``split_last.ENABLED`` off, on, on without one of the
    session's tables (fp8), off again (the spread), then the GEMVs alone off and on: GPU ms a
    token. Printed as ``splitlast <dtype> <setting>
    <json>`` (``gemv8_device.sh`` reads these lines). Outputs are not compared here (the
    chain's steps move its KV state; the kernel tests check the bits)."""
    from tessellm.kernels.gemm import gemv_x2_table, split_last
    from tessellm.kernels.pdl import graph_scope
    from tessellm.quantization.packed import quantize_fp8

    # (name, flag, variant, tables emptied for the run): "on-split" without PREWAIT_TILES,
    # "on-prewait" without the split tables, so each one's share shows
    runs = (("off", False, "silu fold", ()), ("on", True, "silu fold", ()),
            ("on-split", True, "silu fold", ("PREWAIT_TILES",)),
            ("on-prewait", True, "silu fold", ("SPLIT_TABLE", "BF16_SPLIT_TABLE")),
            ("off-again", False, "silu fold", ()), ("gemv-off", False, "gemv", ()),
            ("gemv-on", True, "gemv", ()))
    for fp8 in (True, False):
        layers, head, nbytes = _weights(fp8)
        head8 = quantize_fp8(head) if fp8 else None
        dtype = "fp8" if fp8 else "bf16"
        floor = nbytes - (head.numel() if fp8 else 0)  # fp8: the e4m3 head
        res = {"weight_gb": round(floor / 1e9, 3), "floor_ms_4.25TBs": round(floor / 4.25e9, 3),
               "tables": {t: {str(k): v for k, v in getattr(gemv_x2_table, t).items()}
                          for t in ("SPLIT_TABLE", "PREWAIT_TILES", "BF16_SPLIT_TABLE")},
               "runs": {}}
        for name, on, variant, emptied in runs:
            if not fp8 and name in ("on-split", "on-prewait"):
                continue  # PREWAIT_TILES is the e4m3 GEMV's: bf16 "on" is its split alone
            saved = {t: dict(getattr(gemv_x2_table, t)) for t in emptied}
            try:
                for t in emptied:  # in place: the kernels' modules hold these dicts
                    getattr(gemv_x2_table, t).clear()
                split_last.ENABLED = on
                step = _step_fn(layers, head, fp8, VARIANTS[variant], head8=head8)
                with graph_scope():
                    step()
                    ms = round(graph_ms(step, 3), 4)
            except Exception as e:  # noqa: BLE001
                print("splitlast-error", dtype, name, f"{type(e).__name__}: {e}"[:300],
                      flush=True)
                continue
            finally:
                for t, v in saved.items():
                    getattr(gemv_x2_table, t).update(v)
            res["runs"][name] = {"ms": ms}
            print("splitlast", dtype, name, json.dumps(res["runs"][name]), flush=True)
        split_last.ENABLED = False
        out[dtype] = res
        del layers, head, head8
        torch.cuda.empty_cache()


def b1fuse_section(out: dict) -> None:
    """The engine's chain (SiLU fold, prewait default; fp8 with its e4m3 LM head as under
    TESSELLM_FP8_LM_HEAD=1, and without) against the same with the add-RMSNorm in the o GEMV's
    last program only, and in the o and down GEMVs' (the next layer's input norm and the final
    one too: what the engine runs under TESSELLM_GEMV_NORM_EPILOGUE=1), each also with the decode
    attention's last-split reduce (TESSELLM_ATTN_LAST_REDUCE=1); the base timed again last
    (the spread). GPU ms a token; printed as ``b1fuse <dtype> <json>``."""
    from tessellm.kernels.pdl import graph_scope
    from tessellm.quantization.packed import quantize_fp8

    last = {"last_reduce_max_decodes": 16}
    parts = VARIANTS["silu fold"]
    for fp8 in (True, False):
        layers, head, nbytes = _weights(fp8)
        head8 = quantize_fp8(head) if fp8 else None
        res = {"weight_gb": round(nbytes / 1e9, 3)}
        runs = {"base": {}, "o norm epi": dict(norm_epi=("o",)),
                "o+down norm epi": dict(norm_epi=("o", "down")),
                "last reduce": dict(attn_attrs=last),
                "o norm epi + last reduce": dict(norm_epi=("o",), attn_attrs=last),
                "o+down norm epi + last reduce": dict(norm_epi=("o", "down"), attn_attrs=last),
                "-norm (both norms gone)": dict(parts=("attn", "silufold")),
                "base again": {}}
        if fp8:
            runs.update({"fp8 head": dict(head8=head8),
                         "fp8 head + o+down norm epi": dict(head8=head8, norm_epi=("o", "down")),
                         "fp8 head + o+down norm epi + last reduce": dict(
                             head8=head8, norm_epi=("o", "down"), attn_attrs=last)})
        for name, kw in runs.items():
            kw = dict(kw)
            p = kw.pop("parts", parts)
            dtype = "fp8" if fp8 else "bf16"
            try:
                step = _step_fn(layers, head, fp8, p, **kw)
                with graph_scope():
                    res[name] = round(graph_ms(step, 3), 4)
            except Exception as e:  # noqa: BLE001 - one failing setting leaves the others
                res[name] = f"{type(e).__name__}: {e}"[:200]
                print("b1fuse-error", dtype, f"{name}: {res[name]}", flush=True)
                continue
            print("b1fuse-run", dtype, name, res[name], flush=True)
        out["fp8" if fp8 else "bf16"] = res
        print("b1fuse", "fp8" if fp8 else "bf16", json.dumps(res), flush=True)
        del layers, head, head8
        torch.cuda.empty_cache()


def b1norm2_section(out: dict) -> None:
    """The engine's chain (SiLU fold, prewait default; fp8 with and without its e4m3 LM head)
    against the same with the add-RMSNorms split between the GEMVs around them
    (``gemm/norm_fold.py``, TESSELLM_NORM_FOLD2=1: 63 of the 65 norm launches a token gone),
    and without the norms at all (what they cost); base and fold timed twice (the spread).
    GPU ms a token; printed as ``b1norm2 <dtype> <json>``."""
    from tessellm.kernels.pdl import graph_scope
    from tessellm.quantization.packed import quantize_fp8

    parts = VARIANTS["silu fold"]
    for fp8 in (True, False):
        layers, head, nbytes = _weights(fp8)
        head8 = quantize_fp8(head) if fp8 else None
        res = {"weight_gb": round(nbytes / 1e9, 3)}
        runs = {"base": {}, "fold2": dict(fold2=True),
                "-norm (both norms gone)": dict(parts=("attn", "silufold")),
                "base again": {}, "fold2 again": dict(fold2=True)}
        if fp8:
            runs.update({"fp8 head": dict(head8=head8),
                         "fp8 head + fold2": dict(head8=head8, fold2=True)})
        for name, kw in runs.items():
            kw = dict(kw)
            p = kw.pop("parts", parts)
            dtype = "fp8" if fp8 else "bf16"
            try:
                step = _step_fn(layers, head, fp8, p, **kw)
                with graph_scope():
                    res[name] = round(graph_ms(step, 3), 4)
            except Exception as e:  # noqa: BLE001 - one failing setting leaves the others
                res[name] = f"{type(e).__name__}: {e}"[:200]
                print("b1norm2-error", dtype, f"{name}: {res[name]}", flush=True)
                continue
            print("b1norm2-run", dtype, name, res[name], flush=True)
        out["fp8" if fp8 else "bf16"] = res
        print("b1norm2", "fp8" if fp8 else "bf16", json.dumps(res), flush=True)
        del layers, head, head8
        torch.cuda.empty_cache()


def _decode_us(batch, q, kc, vc, splits, tiles, ws) -> float:
    from bench_attention import D

    from tessellm.kernels.attention import decode_attention

    o = torch.empty_like(q)

    def run():
        decode_attention(q, kc, vc, o, batch.query_start_loc, batch.seq_lens,
                         batch.block_tables, D ** -0.5, num_seqs=q.shape[0],
                         num_splits=splits, workspace=ws, tiles=tiles)

    return graph_ms(run, 10) * 1e3


def attn_long_section(out: dict) -> None:
    from bench_attention import KVH, D, H, make_batch

    gen = torch.Generator().manual_seed(0)
    cases = ((256, 512, 768), (256, 1024, 2048), (512, 1024, 2048), (128, 1024, 2048))
    ws = torch.empty(512 * H * 8 * (D + 2), device="cuda")
    for b, lo, hi in cases:
        seq_lens = torch.randint(lo, hi + 1, (b,), generator=gen).tolist()
        q, _, _, kc, vc, batch = make_batch([1] * b, seq_lens, gen)
        nbytes = sum(seq_lens) * KVH * D * 2 * 2
        row = {}
        for splits in (1, 2):
            for tiles in (None, (64, 4, 4), (64, 8, 3), (128, 8, 2)):
                try:
                    us = _decode_us(batch, q, kc, vc, splits, tiles, ws)
                except Exception as e:  # noqa: BLE001 - a tile that does not fit
                    row[f"s{splits} {tiles}"] = str(e)[:80]
                    continue
                row[f"s{splits} {tiles}"] = [round(us, 1), round(nbytes / us / 1e3)]
        out[f"B{b} ctx{lo}-{hi}"] = row
        print("attn_long", b, lo, hi, json.dumps(row), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sections", nargs="+", default=["chain", "attn_long"])
    p.add_argument("--quick", action="store_true", help="chain: whole, -attn and GEMVs only")
    p.add_argument("--fold", action="store_true",
                   help="chain: bf16 only, with the norm folded at several launch shapes, "
                        "without the split-KV variants")
    p.add_argument("--write-default", action="store_true",
                   help="with --fold: the fastest fold launch shape (by >= 0.5%%) becomes "
                        "NORM_GEMV_CONFIG in this tree's gemv_norm.py")
    args = p.parse_args()
    global QUICK, FOLD_ONLY, WRITE_DEFAULT
    QUICK, FOLD_ONLY, WRITE_DEFAULT = args.quick, args.fold, args.write_default
    args.out.mkdir(parents=True, exist_ok=True)
    run_sections(args.out, args.sections, {"chain": chain_section, "attn_long": attn_long_section,
                                           "b1fp8": b1fp8_section, "prewait": prewait_section,
                                           "b1fuse": b1fuse_section,
                                           "splitlast": splitlast_section,
                                           "b1norm2": b1norm2_section})


if __name__ == "__main__":
    main()
