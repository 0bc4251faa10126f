"""Quantized linear methods: every scheme a backend declares works, and undeclared ones are
refused (None), so the engine can name the backends that do support a scheme."""

from __future__ import annotations

import pytest
import torch

from tessellm.backends.spec import QuantMethod, QuantSpec

# Relative error of x @ W.T allowed per scheme (weights quantized from dense).
REL_TOL = {"fp8": 0.08, "fp8_block": 0.08, "int8": 0.02, "awq": 0.2, "gptq": 0.2, "gguf": 0.2,
           "bitsandbytes": 0.2}


def _schemes(target, missing: list):
    """The declared schemes whose optional package (``quantization.SCHEME_PACKAGES``) imports
    here; the others go to ``missing`` as "scheme (package)", for ``_skip_missing``."""
    from tessellm.quantization import missing_package

    schemes = []
    for scheme in target.backend.capabilities.get("quantization") or []:
        package = missing_package(scheme)
        if package is None:
            schemes.append(scheme)
        else:
            missing.append(f"{scheme!r} (needs the {package!r} package)")
    return schemes


def _skip_missing(target, missing: list) -> None:
    """After the other schemes were checked: a skip naming those left unchecked."""
    if missing:
        pytest.skip(f"{target.name}: not checked, optional package not installed: "
                    f"{', '.join(missing)}")


def test_undeclared_scheme_is_refused(target):
    assert target.registry.quant_method(target.backend, QuantSpec("no-such-scheme")) is None


def test_declared_schemes(target):
    missing = []
    schemes = _schemes(target, missing)
    if not schemes and not missing:
        pytest.skip(f"{target.name} declares no quantization schemes")
    dev = target.device
    for scheme in schemes:
        method = target.registry.quant_method(target.backend, QuantSpec(scheme, dtype=torch.float32))
        assert method is not None, f"{target.name} declares {scheme!r} but returns no method"
        assert isinstance(method, QuantMethod)
        g = torch.Generator().manual_seed(0)
        weight = torch.randn(48, 64, generator=g).to(dev)
        bias = torch.randn(48, generator=g).to(dev)
        x = torch.randn(5, 64, generator=g).to(dev)
        # int4: one decode row too (a backend may take a GEMV there, as cuda's does)
        xs = (x[:1], x) if scheme in ("awq", "gptq", "gguf") else (x,)
        layer = torch.nn.Module()
        with torch.device(dev):
            method.create_weights(layer, 64, 48, torch.float32)
        try:
            method.quantize_dense(layer, weight)
        except NotImplementedError:
            continue  # loads pre-quantized checkpoints only
        method.process_weights_after_loading(layer)
        for x in xs:
            out = method.apply(layer, x, bias)
            want = x @ weight.t() + bias
            assert out.shape == want.shape and out.dtype == x.dtype
            rel = ((out.float() - want).norm() / want.norm()).item()
            assert rel < REL_TOL.get(scheme, 0.2), (f"{scheme}, {x.shape[0]} rows: relative "
                                                    f"error {rel:.3f}")
    _skip_missing(target, missing)


def test_apply_silu_and_mul(target):
    """The optional ``QuantMethod.apply_silu_and_mul`` on a stacked [gate; up] layer at 1-2 rows:
    None (not offered: the MLP runs ``apply`` and the activation) or ``silu_and_mul`` of the
    quantized product, within the scheme's error of the dense one."""
    from tessellm.backends.reference.ops import ReferenceOps

    tried, missing = 0, []
    for scheme in _schemes(target, missing):
        method = target.registry.quant_method(target.backend, QuantSpec(scheme, dtype=torch.float32))
        if getattr(method, "apply_silu_and_mul", None) is None:
            continue
        g = torch.Generator().manual_seed(1)
        weight = torch.randn(48, 64, generator=g).to(target.device)
        bias = torch.randn(48, generator=g).to(target.device)
        layer = torch.nn.Module()
        layer.input_size, layer.output_size, layer.output_sizes = 64, 48, [24, 24]
        with torch.device(target.device):
            method.create_weights(layer, 64, 48, torch.float32)
        try:
            method.quantize_dense(layer, weight)
        except NotImplementedError:
            continue
        method.process_weights_after_loading(layer)
        for rows in (1, 2):
            x = torch.randn(rows, 64, generator=g).to(target.device)
            out = method.apply_silu_and_mul(layer, x, bias)
            if out is None:
                continue
            tried += 1
            want = ReferenceOps().silu_and_mul(x @ weight.t() + bias)
            assert out.shape == want.shape and out.dtype == x.dtype
            rel = ((out.float() - want).norm() / want.norm()).item()
            assert rel < 2 * REL_TOL.get(scheme, 0.2), f"{scheme}: relative error {rel:.3f}"
    _skip_missing(target, missing)
    if not tried:
        pytest.skip(f"{target.name} offers no apply_silu_and_mul")


def test_apply_add_rms_norm(target):
    """The optional ``QuantMethod.apply_add_rms_norm`` at one row: None (not offered: the
    decoder runs ``apply`` and the norm) or ``fused_add_rms_norm`` of the quantized product,
    ``(normed, residual)``, within the scheme's error of the dense one. x in float32 and in
    the low-precision dtype (the one-row fused kernels take 16-bit rows)."""
    from tessellm.backends.reference.ops import ReferenceOps

    tried, missing = 0, []
    for scheme in _schemes(target, missing):
        method = target.registry.quant_method(target.backend, QuantSpec(scheme, dtype=torch.float32))
        if getattr(method, "apply_add_rms_norm", None) is None:
            continue
        g = torch.Generator().manual_seed(2)
        weight = torch.randn(48, 64, generator=g).to(target.device)
        layer = torch.nn.Module()
        layer.input_size, layer.output_size, layer.output_sizes = 64, 48, [48]
        with torch.device(target.device):
            method.create_weights(layer, 64, 48, torch.float32)
        try:
            method.quantize_dense(layer, weight)
        except NotImplementedError:
            continue
        method.process_weights_after_loading(layer)
        for dtype in (torch.float32, target.low_precision_dtype):
            x = torch.randn(1, 64, generator=g).to(target.device, dtype)
            res = torch.randn(1, 48, generator=g).to(target.device, dtype)
            norm_w = (1 + 0.1 * torch.randn(48, generator=g)).to(target.device, dtype)
            out = method.apply_add_rms_norm(layer, x, res.clone(), norm_w, 1e-5)
            if out is None:
                continue
            tried += 1
            normed, new_res = out
            want_n, want_r = ReferenceOps().fused_add_rms_norm(
                x.float() @ weight.t(), res.float(), norm_w.float(), 1e-5)
            assert normed.shape == want_n.shape and new_res.shape == want_r.shape
            for got, want in ((new_res, want_r), (normed, want_n)):
                rel = ((got.float() - want).norm() / want.norm()).item()
                assert rel < 2 * REL_TOL.get(scheme, 0.2), f"{scheme}: relative error {rel:.3f}"
    _skip_missing(target, missing)
    if not tried:
        pytest.skip(f"{target.name} offers no apply_add_rms_norm")


def test_apply_norm_fold(target):
    """The optional pair ``QuantMethod.apply_add_rms_norm_fold`` / ``apply_rms_scaled`` (API
    23) at one row: None (not offered) or the split norm around two quantized products, within
    the scheme's error of the dense unfused path (product, ``fused_add_rms_norm``, product),
    plain and with ``silu_and_mul``."""
    from tessellm.backends.reference.ops import ReferenceOps

    def make(method, out, inp, g):
        weight = torch.randn(out, inp, generator=g).to(target.device) * inp ** -0.5
        layer = torch.nn.Module()
        layer.input_size, layer.output_size, layer.output_sizes = inp, out, [out]
        with torch.device(target.device):
            method.create_weights(layer, inp, out, torch.float32)
        method.quantize_dense(layer, weight)
        method.process_weights_after_loading(layer)
        return layer, weight

    tried, missing = 0, []
    for scheme in _schemes(target, missing):
        method = target.registry.quant_method(target.backend, QuantSpec(scheme, dtype=torch.float32))
        if (getattr(method, "apply_add_rms_norm_fold", None) is None
                or getattr(method, "apply_rms_scaled", None) is None):
            continue
        g = torch.Generator().manual_seed(3)
        try:
            o, w_o = make(method, 64, 64, g)  # GGUF: blocks of 32
            c, w_c = make(method, 64, 64, g)
        except NotImplementedError:
            continue
        for dtype in (torch.float32, target.low_precision_dtype):
            x = torch.randn(1, 64, generator=g).to(target.device, dtype)
            res = torch.randn(1, 64, generator=g).to(target.device, dtype)
            norm_w = (1 + 0.1 * torch.randn(64, generator=g)).to(target.device, dtype)
            out = method.apply_add_rms_norm_fold(o, x, res.clone(), norm_w)
            if out is None:
                continue
            xg, sumsq, new_res = out
            normed, want_r = ReferenceOps().fused_add_rms_norm(
                x.float() @ w_o.t(), res.float(), norm_w.float(), 1e-5)
            for silu in (False, True):
                y = method.apply_rms_scaled(c, xg, sumsq, 1e-5, None, silu)
                if y is None:
                    continue
                tried += 1
                want = normed @ w_c.t()
                if silu:
                    want = ReferenceOps().silu_and_mul(want)
                assert y.shape == want.shape and new_res.shape == want_r.shape
                for got, ref in ((new_res, want_r), (y, want)):
                    rel = ((got.float() - ref).norm() / ref.norm()).item()
                    assert rel < 2 * REL_TOL.get(scheme, 0.2), f"{scheme}: relative error {rel:.3f}"
    _skip_missing(target, missing)
    if not tried:
        pytest.skip(f"{target.name} offers no apply_add_rms_norm_fold / apply_rms_scaled")


def test_apply_prequantized(target):
    """The optional fp8 activation fold of a quant method (``prequantized_dtype``,
    ``apply_prequantized``): where a layer of one fp8 segment asks for its input quantized at
    some rows, its product of the reference quantizer's ``Fp8Activation`` matches the reference
    W8A8 product (``reference.quant_ops.TorchQuantOps.fp8_mm_prequantized``); a layer of
    another scheme never asks."""
    from tessellm.backends.reference.quant_ops import TorchQuantOps
    from tessellm.quantization.packed import Fp8Activation

    method = None
    if "fp8" in _schemes(target, []):
        method = target.registry.quant_method(target.backend, QuantSpec("fp8", dtype=torch.float32))
    if getattr(method, "apply_prequantized", None) is None:
        pytest.skip(f"{target.name} offers no fp8 apply_prequantized (optional)")
    g = torch.Generator().manual_seed(2)
    weight = (torch.randn(48, 64, generator=g) * 0.1).to(target.device)
    bias = torch.randn(48, generator=g).to(target.device)
    layer = torch.nn.Module()
    with torch.device(target.device):
        method.create_weights(layer, 64, 48, torch.float32)
    method.quantize_dense(layer, weight)
    method.process_weights_after_loading(layer)
    tried = 0
    for rows in (1, 2, 40, 100):
        fp8 = method.prequantized_dtype(layer, rows)
        if fp8 is None:
            continue
        tried += 1
        x = torch.randn(rows, 64, generator=g).to(target.device)
        xa = Fp8Activation.quantize(x, fp8)
        out = method.apply_prequantized(layer, xa, bias)
        want = TorchQuantOps().fp8_mm_prequantized(xa, layer.segments[0], bias)
        assert out.shape == want.shape and out.dtype == torch.float32
        rel = ((out.float() - want).norm() / want.norm()).item()
        assert rel < 1e-2, f"rows {rows}: relative error {rel:.2e} against the reference"
    if not tried:
        pytest.skip(f"{target.name}'s fp8 method asks for no pre-quantized input at 1-100 rows")


def test_fp8_block_checkpoint_layer(target):
    """A block-wise fp8 checkpoint's layer (``fp8_block``: Qwen3-FP8 / DeepSeek-V3, e4m3
    ``weight`` with ``weight_scale_inv`` per 128x128 block, ``quantization/fp8_block.py``) of
    two fused shards, the second's rows ending inside a block: its product is the dequantized
    weight's (W8A16) or within e4m3 activation error of it (W8A8 per token and group of 128)."""
    from tessellm.quantization.fp8_block import dequantize_block, quantize_block_tensors

    if "fp8_block" not in _schemes(target, []):
        pytest.skip(f"{target.name} does not declare fp8_block")
    spec = QuantSpec("fp8_block", {"prequantized": True, "weight_block_size": (128, 128)},
                     dtype=torch.float32)
    method = target.registry.quant_method(target.backend, spec)
    assert method is not None, f"{target.name} declares 'fp8_block' but returns no method"
    g = torch.Generator().manual_seed(5)
    sizes, k = [128, 72], 200  # K: one whole block and a short one
    layer = _fused_layer(target, method, sizes, k)
    dense = []
    for shard, n in enumerate(sizes):
        q, s = quantize_block_tensors(torch.randn(n, k, generator=g), (128, 128))
        method.load_weight(layer, "weight", q.to(target.device), shard)
        method.load_weight(layer, "weight_scale_inv", s.to(target.device), shard)
        dense.append(dequantize_block(q, s, (128, 128)))
    _assert_dequantized_products(target, method, layer, torch.cat(dense), g, 0.05)


def _fused_layer(target, method, sizes: list, k: int) -> torch.nn.Module:
    """A bare layer of ``len(sizes)`` fused output shards over ``k`` inputs, made by ``method``."""
    layer = torch.nn.Module()
    layer.input_size, layer.output_size, layer.output_sizes = k, sum(sizes), sizes
    with torch.device(target.device):
        method.create_weights(layer, k, sum(sizes), torch.float32)
    return layer


def _assert_dequantized_products(target, method, layer, dense: torch.Tensor, g, bound: float):
    """After loading: at 1 and 9 rows ``apply`` is ``x @ dense.T`` within ``bound`` (relative)."""
    method.process_weights_after_loading(layer)
    for rows in (1, 9):
        x = torch.randn(rows, dense.shape[1], generator=g)
        out = method.apply(layer, x.to(target.device))
        want = x @ dense.cpu().t()  # (a weight loaded onto the device may take its state along)
        assert out.shape == want.shape and out.dtype == torch.float32
        rel = ((out.cpu() - want).norm() / want.norm()).item()
        assert rel < bound, f"rows {rows}: relative error {rel:.2e} against the dequantized weight"


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bnb4_checkpoint_layer(target, quant_type):
    """A bitsandbytes 4-bit checkpoint's layer (``QuantOps.bnb4_mm``; ``quantization/bnb.py``:
    codes two a byte, one absmax per 64 flattened weights, the type's 16-entry table) of two
    fused shards, the first ending inside a block (so they stay two segments): at 1 and 9 rows
    its product is the dequantized weight's. Needs no bitsandbytes package (the checkpoint
    codes come from ``bnb.quantize_bnb4``; the loader hands such a weight over whole, its state
    gathered with it: ``bnb_stored.StoredBnb``)."""
    from tessellm.quantization.bnb import quantize_bnb4
    from tessellm.quantization.bnb_stored import StoredBnb

    if "bitsandbytes" not in (target.backend.capabilities.get("quantization") or []):
        pytest.skip(f"{target.name} does not declare bitsandbytes")
    spec = QuantSpec("bitsandbytes", {"prequantized": True, "format": "bnb4"},
                     dtype=torch.float32)
    method = target.registry.quant_method(target.backend, spec)
    assert method is not None, f"{target.name} declares 'bitsandbytes' but returns no method"
    g = torch.Generator().manual_seed(6)
    sizes, k = [20, 24], 72  # 20 x 72 = 22.5 blocks of 64
    layer = _fused_layer(target, method, sizes, k)
    dense = []
    for shard, n in enumerate(sizes):
        w = quantize_bnb4(torch.randn(n, k, generator=g), quant_type)
        method.load_weight(layer, "weight", StoredBnb(f"shard{shard}.weight", w), shard)
        dense.append(w.dequantize())
    _assert_dequantized_products(target, method, layer, torch.cat(dense), g, 1e-4)


def test_int4_layer_at_every_row_count(target):
    """An AWQ / GPTQ layer of two fused shards at K = 256 in groups of 128 (the shape a backend
    may re-lay for a tensor-core kernel at load: the cuda one's ``prepare_int4``) at 1, 4, 5,
    17 and 40 rows: each product within the scheme's error of the dense one, and the rows of
    every row count equal the one-row product's (the decode and the batched kernels agree)."""
    tried, missing = 0, []
    for scheme in _schemes(target, missing):
        if scheme not in ("awq", "gptq"):
            continue
        spec = QuantSpec(scheme, {"group_size": 128}, dtype=torch.float32)
        method = target.registry.quant_method(target.backend, spec)
        g = torch.Generator().manual_seed(7)
        sizes, k = [64, 32], 256
        weight = torch.randn(sum(sizes), k, generator=g)
        layer = torch.nn.Module()
        layer.input_size, layer.output_size, layer.output_sizes = k, sum(sizes), sizes
        with torch.device(target.device):
            method.create_weights(layer, k, sum(sizes), torch.float32)
        try:
            method.quantize_dense(layer, weight.to(target.device))
        except NotImplementedError:
            continue
        method.process_weights_after_loading(layer)
        tried += 1
        x = torch.randn(40, k, generator=g)
        one = method.apply(layer, x[:1].to(target.device)).cpu()
        for rows in (1, 4, 5, 17, 40):
            out = method.apply(layer, x[:rows].to(target.device)).cpu()
            want = x[:rows] @ weight.t()
            assert out.shape == want.shape and out.dtype == torch.float32
            rel = ((out - want).norm() / want.norm()).item()
            assert rel < REL_TOL[scheme], f"{scheme}, {rows} rows: relative error {rel:.3f}"
            agree = ((out[:1] - one).norm() / one.norm()).item()
            assert agree < 1e-2, (f"{scheme}: row 0 at {rows} rows differs from the one-row "
                                  f"product by {agree:.2e}")
    _skip_missing(target, missing)
    if not tried:
        pytest.skip(f"{target.name} declares neither awq nor gptq")
