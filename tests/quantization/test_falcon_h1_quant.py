"""Falcon-H1 quantized: fp8 (block-wise and per-tensor checkpoints, or quantized on load), int8
on load, AWQ / GPTQ int4 checkpoints, on the linear projections (attention, the Mamba mixer's
``in_proj`` / ``out_proj``, the MLP), with every muP multiplier away from 1.

Falcon-H1 folds its multipliers into the projections as they load (``models/falcon_h1.py``):
a quantized checkpoint keeps its codes and takes each fold in its scales (``in_proj``'s five
``ssm_multipliers``, one a stored part, per output row of the scales), a dense one is folded,
then quantized. Checkpoints are the test-side packers' (``block_fp8_checkpoint.py``,
``int4_checkpoint.py``) from a tiny random HF Falcon-H1, with their *dequantized* checkpoint
beside them (unfolded weights: HF applies the multipliers at run time). Served on the cpu
backend in float32 (int4: its float32 reference ops), the quantized checkpoint gives the
dequantized one's greedy tokens, served by tessellm and by HF transformers; a fold missing
from a scale (or applied twice) changes them (``test_falcon_h1.py::
test_falcon_h1_multipliers_matter``).
"""

from __future__ import annotations

import pytest
import torch

from tessellm.quantization.loading import quantized_linears
from tests.conftest import hf_greedy
from tests.models.test_falcon_h1 import falcon_h1_config
from tests.quantization.block_fp8_checkpoint import (build, generate, write_block_fp8,
                                                     write_fp8_per_tensor)
from tests.quantization.int4_checkpoint import write_int4

PROMPTS = [[5, 17, 42, 99, 3, 120], list(range(40, 60)), [100, 12]]
MAX_NEW = 8
BLOCK = [32, 32]  # in_proj [z 96 | x 96 | B 32 | C 32 | dt 8]: every part but dt on a block


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    """Mamba heads of 12 (8 of them: dt is one word of 8 packed AWQ outputs, as in the released
    models' 24-32 heads)."""
    from tests.models.variant_parity import save_tiny

    config = falcon_h1_config(mamba_n_heads=8, mamba_d_head=12, initializer_range=0.1)
    return save_tiny(config, str(tmp_path_factory.mktemp("falconh1-quant") / "dense"))


@pytest.fixture(scope="module")
def int4_dirs(dense_dir, tmp_path_factory):
    return write_int4(dense_dir, tmp_path_factory.mktemp("falconh1-int4"))


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_int4_falcon_h1_serves_the_dequantized_model(int4_dirs, fmt, monkeypatch):
    want = generate(int4_dirs["deq"], PROMPTS, MAX_NEW)
    assert want == hf_greedy(int4_dirs["deq"], PROMPTS, MAX_NEW)
    monkeypatch.setenv("TESSELLM_CPU_INT4PACK", "0")  # the float32 reference ops
    assert generate(int4_dirs[fmt], PROMPTS, MAX_NEW) == want


def test_block_fp8_falcon_h1_serves_the_dequantized_model(dense_dir, tmp_path):
    """Blocks of 32x32 (the parts of ``in_proj`` start on a block, as in the released
    block-fp8 layouts): each block's scale takes its part's multiplier."""
    fp8_dir, deq_dir = write_block_fp8(dense_dir, str(tmp_path / "fp8"), str(tmp_path / "deq"),
                                       block=BLOCK)
    want = generate(deq_dir, PROMPTS, MAX_NEW)
    assert want == hf_greedy(deq_dir, PROMPTS, MAX_NEW)
    assert generate(fp8_dir, PROMPTS, MAX_NEW) == want


def test_per_tensor_fp8_folds_into_each_scale(dense_dir, tmp_path):
    """A per-tensor fp8 checkpoint (one scale for the whole stored ``in_proj``): every layer's
    codes times its scales are the folded dequantized weights the dense model holds, so the
    five ``ssm_multipliers`` went into per-row scales of the parts, the others into the scalar
    scales (fp8 is W8A8 here, so tokens are not compared)."""
    fp8_dir, deq_dir = write_fp8_per_tensor(dense_dir, str(tmp_path / "fp8"),
                                            str(tmp_path / "deq"))
    dense = dict(build(deq_dir).named_modules())
    layers = quantized_linears(build(fp8_dir))
    assert any(n.endswith("mamba.in_proj") for n in layers) and len(layers) == 3 * 6
    for name, layer in layers.items():
        got = torch.cat([s.dequantize() for s in layer.segments])
        torch.testing.assert_close(got, dense[name].weight.data, rtol=1e-6, atol=0, msg=name)


@pytest.mark.parametrize("scheme, step", [("int8", 127), ("fp8", 16)])
def test_quantized_on_load_after_the_fold(dense_dir, scheme, step):
    """``quantization="int8"`` / ``"fp8"`` on the dense checkpoint quantize the folded weights:
    each layer's dequantized weight is the dense (folded) one to within its rounding (half a
    step of the row's scale for int8, e4m3's 2^-4 relative for fp8)."""
    dense = dict(build(dense_dir).named_modules())
    layers = quantized_linears(build(dense_dir, quantization=scheme))
    assert len(layers) == 3 * 6
    for name, layer in layers.items():
        w = dense[name].weight.data
        got = torch.cat([s.dequantize() for s in layer.segments])
        if scheme == "int8":
            bound = w.abs().amax(1, keepdim=True) / step * 0.5 + 1e-7
        else:
            bound = w.abs() / step + w.abs().amax(1, keepdim=True) * 2.0 ** -9
        assert bool(((got - w).abs() <= bound).all()), name


def test_block_factor_inside_a_block_is_refused():
    """A block of rows holding two parts whose multipliers differ cannot carry both."""
    from tessellm.models.falcon_h1 import fold_multiplier

    factor = torch.tensor([1.0] * 20 + [2.0] * 12)
    with pytest.raises(ValueError, match="ssm_multipliers differ inside one block of 16 rows"):
        fold_multiplier("layers.0.mamba.in_proj", "weight_scale_inv", torch.ones(2, 1),
                        factor, None, block_rows=16)
    ok = fold_multiplier("layers.0.mamba.in_proj", "weight_scale_inv", torch.ones(2, 1),
                         torch.tensor([1.0] * 16 + [2.0] * 16), None, block_rows=16)
    assert ok.flatten().tolist() == [1.0, 2.0]


def test_engine_args_serve_the_schemes_and_refuse_gguf():
    """Checked before any worker: the hybrids' schemes pass for Falcon-H1 too, GGUF is refused."""
    from types import SimpleNamespace

    from transformers import FalconH1Config

    from tessellm.models.state_space import check_engine_args

    config = FalconH1Config(architectures=["FalconH1ForCausalLM"])
    for scheme in ("fp8", "int8", "fp8_block", None):
        check_engine_args(SimpleNamespace(quantization=scheme), config)
    config.quantization_config = {"quant_method": "awq", "bits": 4, "group_size": 128}
    check_engine_args(SimpleNamespace(quantization=None), config)
    with pytest.raises(ValueError, match="does not support quantization gguf yet"):
        check_engine_args(SimpleNamespace(quantization="gguf"), FalconH1Config(
            architectures=["FalconH1ForCausalLM"]))
