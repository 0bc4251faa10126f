"""Block-wise fp8 checkpoints (Qwen3-*-FP8, DeepSeek-V3 style: ``weight_block_size [128, 128]``,
``weight_scale_inv`` per block), dense layers:

* the Triton kernels (per-token-group activation quantization, block-scaled W8A8 GEMM) against
  the pure-torch reference at tiny shapes (on the GPU where there is one, else through
  Triton's interpreter on the CPU);
* tiny random Llama and Qwen3 models written as block-fp8 checkpoints (``block_fp8_checkpoint``)
  served on the cpu backend (weights kept fp8, dequantized a slab at a time: W8A16) give the
  greedy tokens of the same models served from the dequantized checkpoint, and HF transformers
  gives those tokens from the dequantized checkpoint too (float32);
* tensor parallelism: each rank holds exactly its rows/columns of weights *and* block scales,
  and a split off a block boundary is refused naming the fix;
* bad input (a block size the kernels do not take, ``activation_scheme: static``) refused with
  one sentence naming the fix.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from tessellm import LLM, SamplingParams
from tessellm.backends.reference.quant_ops import TorchQuantOps
from tessellm.quantization.fp8_block import (Fp8BlockWeight, quantize_fp8_block,
                                             quantize_per_token_group, w8a8_block_reference)
from tests.quantization.block_fp8_checkpoint import (assert_serves_dequantized, build,
                                                     checkpoint_maker, generate)
from tests.gpu_set import gpu_when_present

# the Triton kernels' inputs: on the GPU where there is one (the interpreter takes CPU tensors)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PROMPTS = [[5, 17, 42, 99, 3, 250], [7, 7, 7], list(range(40, 80)), [200, 12]]
MAX_NEW = 12


# -- kernels against the reference -------------------------------------------------------------


@pytest.mark.parametrize("m,n,k,block", [(1, 40, 96, (16, 32)), (7, 33, 64, (32, 16)),
                                         (5, 130, 200, (128, 128)), (20, 64, 128, (128, 64))])
@gpu_when_present
def test_triton_block_gemm_matches_reference(m, n, k, block):
    """Short last blocks in N and K (33 rows of 32, 200 inputs of 128), M above one tile."""
    from tessellm.kernels.gemm.fp8_block import fp8_block_gemm, fp8_block_mm, quantize_fp8_groups

    g = torch.Generator().manual_seed(m * 1000 + n)
    w = quantize_fp8_block(torch.randn(n, k, generator=g), block)
    x = torch.randn(m, k, generator=g) * 3
    bias = torch.randn(n, generator=g)
    rqx, rsx = quantize_per_token_group(x, block[1])
    want = w8a8_block_reference(x, w, bias)  # on the CPU, before the kernels' inputs move
    x, bias, w = x.to(DEVICE), bias.to(DEVICE), w.to(DEVICE)
    qx, sx = quantize_fp8_groups(x, block[1])
    assert torch.equal(qx.float().cpu(), rqx.float()) and torch.equal(sx.cpu(), rsx)
    # fp8 tensor cores (sm89+) sum a K tile's products in less than float32 (Hopper's wgmma:
    # well under 2^-11 of the sum's scale), the interpreter and fp16 dots exactly
    atol = 5e-4 * want.abs().max().item() if DEVICE.type == "cuda" else 1e-4
    torch.testing.assert_close(fp8_block_gemm(qx, sx, w, torch.float32, bias).cpu(), want,
                               rtol=1e-5, atol=atol)
    torch.testing.assert_close(fp8_block_mm(x, w, bias).cpu(), want, rtol=1e-5, atol=atol)


def test_reference_forms_agree_with_the_dequantized_product():
    """W8A16 (the cpu's form) is the dequantized weight's product; W8A8 is within e4m3's
    activation error of it."""
    g = torch.Generator().manual_seed(0)
    w = quantize_fp8_block(torch.randn(200, 300, generator=g), (128, 128))
    x = torch.randn(4, 300, generator=g)
    dense = x @ w.dequantize().t()
    torch.testing.assert_close(TorchQuantOps().fp8_block_mm(x, w), dense, rtol=1e-5, atol=1e-5)
    rel = ((w8a8_block_reference(x, w) - dense).norm() / dense.norm()).item()
    assert 0 < rel < 0.05


def test_cpu_caches_the_dequantized_weight_and_releases_the_codes():
    """The cpu backend dequantizes a segment once: the same product as the reference's slabs,
    ``dequantize`` unchanged, the e4m3 codes' storage gone."""
    from tessellm.backends.cpu.quant_ops import CpuQuantOps

    g = torch.Generator().manual_seed(1)
    w = quantize_fp8_block(torch.randn(200, 300, generator=g), (128, 128))
    before = w.dequantize()
    x = torch.randn(3, 300, generator=g)
    want = TorchQuantOps().fp8_block_mm(x, w)
    assert torch.equal(CpuQuantOps().fp8_block_mm(x, w), want)
    assert w.qweight.untyped_storage().nbytes() == 1 and torch.equal(w.dequantize(), before)
    assert torch.equal(CpuQuantOps().fp8_block_mm(x, w), want)


def test_block_scales_are_per_block():
    """A block of large values does not coarsen its neighbours (per-channel scales would)."""
    w = torch.full((256, 256), 0.01)
    w[:128, :128] = 100.0
    seg = quantize_fp8_block(w, (128, 128))
    assert seg.scales.shape == (2, 2)
    torch.testing.assert_close(seg.dequantize()[128:, 128:], w[128:, 128:])


# -- tiny models -------------------------------------------------------------------------------


def _configs():
    from transformers import LlamaConfig, Qwen3Config

    common = dict(vocab_size=256, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    return {
        # q/k/v rows 256 each (one merged segment; 128 a rank at T=2); MLP inputs of 512
        "llama": LlamaConfig(**dict(common, num_key_value_heads=4), intermediate_size=512),
        # head_dim 32: q 128, k/v 64 rows (k ends inside a block: three segments); MLP of 320
        # (the last row and input block short)
        "qwen3": Qwen3Config(**common, intermediate_size=320, head_dim=32),
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return checkpoint_maker(tmp_path_factory.mktemp("block-fp8"), _configs(), seed=7)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_checkpoint_serves_the_dequantized_model(checkpoints, arch):
    assert_serves_dequantized(*checkpoints(arch), PROMPTS, MAX_NEW)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_layers_keep_fp8_codes_and_block_scales(checkpoints, arch):
    """Every quantized linear holds e4m3 codes with [ceil(N/128), ceil(K/128)] scales, equal
    to the checkpoint's tensors (nothing requantized)."""
    from safetensors.torch import load_file

    from tessellm.quantization.loading import quantized_linears

    fp8_dir, _ = checkpoints(arch)
    stored = load_file(os.path.join(fp8_dir, "model.safetensors"))
    model = build(fp8_dir)
    layers = quantized_linears(model)
    assert layers
    for name, layer in layers.items():
        assert all(isinstance(s, Fp8BlockWeight) for s in layer.segments), name
        assert all(s.qweight.dtype == torch.float8_e4m3fn for s in layer.segments)
    qkv = layers["layers.0.self_attn.qkv_proj"]
    parts = [stored[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"]
    assert len(qkv.segments) == (1 if arch == "llama" else 2)  # qwen3: k ends mid-block
    assert torch.equal(torch.cat([s.qweight for s in qkv.segments]).view(torch.uint8),
                       torch.cat(parts).view(torch.uint8))
    down = layers["layers.1.mlp.down_proj"].segments[0]
    assert torch.equal(down.scales, stored["model.layers.1.mlp.down_proj.weight_scale_inv"])


@gpu_when_present
def test_cuda_backend_kernels_serve_a_layer_close_to_the_dequantized_model(checkpoints):
    """The cuda backend's method (Triton W8A8; interpreted on the CPU without a GPU) on the
    Qwen3 checkpoint's layers: each layer's product within e4m3 activation error of the
    dequantized weight's."""
    from tessellm.quantization.loading import quantized_linears

    fp8_dir, _ = checkpoints("qwen3")
    layers = quantized_linears(build(fp8_dir, backend="cuda", device=DEVICE))
    g = torch.Generator().manual_seed(3)
    for name in ("layers.0.self_attn.qkv_proj", "layers.1.mlp.down_proj"):
        layer = layers[name]
        x = torch.randn(3, layer.input_size, generator=g)
        dense = x @ torch.cat([s.dequantize().cpu() for s in layer.segments]).t()
        rel = ((layer(x.to(DEVICE)).cpu() - dense).norm() / dense.norm()).item()
        assert rel < 0.05, (name, rel)


# -- tensor parallelism ------------------------------------------------------------------------


def test_ranks_hold_their_part_of_weights_and_scales(checkpoints):
    from tests.distributed.test_parallel_prequantized import assert_ranks_hold_their_part

    fp8_dir, _ = checkpoints("llama")
    assert_ranks_hold_their_part(fp8_dir, "cpu", 2, build=lambda p, b, tp=None, quantization=None:
                                 build(p, tp, b))


def test_tp2_serves_the_one_device_tokens(checkpoints):
    fp8_dir, _ = checkpoints("llama")
    assert (generate(fp8_dir, PROMPTS, MAX_NEW, tensor_parallel_size=2)
            == generate(fp8_dir, PROMPTS, MAX_NEW))


def test_split_off_a_block_boundary_is_refused(checkpoints):
    """Qwen3's MLP of 320 over 2 ranks: 160 inputs of down_proj each (and q_proj's 128 rows:
    64 each), off the 128 blocks; the first layer read is named."""
    from tessellm.distributed.parallel_state import TensorParallel

    fp8_dir, _ = checkpoints("qwen3")
    with pytest.raises(ValueError, match=r"layers\.0\.\S+ cannot be split over "
                       r"tensor_parallel_size=2.*fp8 blocks of 128x128.*multiple of 128"):
        build(fp8_dir, TensorParallel(0, 2))


# -- refusals ----------------------------------------------------------------------------------


def _edit_config(path, dst, **changes):
    import shutil

    shutil.copytree(path, dst)
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"].update(changes)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return str(dst)


@pytest.mark.parametrize("changes,match", [
    (dict(weight_block_size=[128, 96]), r"weight_block_size \[128, 96\] is not supported.*power "
                                        r"of two from 16 to 1024.*requantize"),
    (dict(weight_block_size=[128]), r"weight_block_size \[128\] must be two integers"),
    (dict(activation_scheme="static"), r"activation_scheme 'static'.*set \"activation_scheme\": "
                                       r"\"dynamic\""),
    (dict(fmt="e5m2"), r"only e4m3"),
])
def test_bad_quantization_config_is_refused(checkpoints, tmp_path, changes, match):
    fp8_dir, _ = checkpoints("qwen3")
    path = _edit_config(fp8_dir, tmp_path / "edited", **changes)
    with pytest.raises(ValueError, match=match):
        LLM(path, dtype="float32")


def test_static_per_channel_checkpoint_without_input_scales_is_refused(checkpoints, tmp_path):
    """Per-channel fp8 (``quant_method: fp8`` without blocks) saying ``activation_scheme:
    static`` but storing no ``input_scale``: refused naming the layer and the fix."""
    from safetensors.torch import load_file

    from tessellm.quantization.packed import quantize_fp8
    from tests.quantization.block_fp8_checkpoint import quantized_names, write_checkpoint

    _, dequant_dir = checkpoints("qwen3")
    state = load_file(os.path.join(dequant_dir, "model.safetensors"))
    for name in quantized_names(state):
        seg = quantize_fp8(state[name])
        state[name], state[name + "_scale"] = seg.qweight, seg.scales[:, None]
    path = str(tmp_path / "static")
    write_checkpoint(path, state, dequant_dir, {"quant_method": "fp8", "activation_scheme": "static"})
    with pytest.raises(ValueError, match=r"activation_scheme 'static', but layers\.\d+\.\S+ "
                                         r"has no input_scale; set \"activation_scheme\": "
                                         r"\"dynamic\""):
        build(path)


def test_scales_of_another_block_size_are_refused(checkpoints, tmp_path):
    """A config saying [64, 64] for scales made with [128, 128]: named, not misread."""
    fp8_dir, _ = checkpoints("qwen3")
    path = _edit_config(fp8_dir, tmp_path / "edited", weight_block_size=[64, 64])
    with pytest.raises(ValueError, match=r"weight_scale_inv has shape .* needs .*does "
                                         r"weight_block_size in config.json match"):
        build(path)


def test_another_scheme_is_refused_and_fp8_accepted(checkpoints):
    from tessellm.config import resolve_model
    from tessellm.quantization.config import resolve_quant_spec

    fp8_dir, _ = checkpoints("qwen3")
    source = resolve_model(fp8_dir)
    assert resolve_quant_spec("fp8", source).scheme == "fp8_block"
    assert resolve_quant_spec(None, source).config["weight_block_size"] == (128, 128)
    with pytest.raises(ValueError, match="quantized with fp8 \\(fp8_block\\); leave quantization"):
        resolve_quant_spec("int8", source)


def test_quantize_on_load_and_dummy(checkpoints):
    """``quantization="fp8_block"`` on a dense checkpoint quantizes each 128x128 block on load:
    the same codes and scales as the checkpoint writer's."""
    from tessellm.quantization.loading import quantized_linears

    fp8_dir, _ = checkpoints("llama")
    dense_dir = os.path.join(os.path.dirname(fp8_dir), "llama-dense")
    a = quantized_linears(build(dense_dir, quantization="fp8_block"))
    b = quantized_linears(build(fp8_dir))
    for name in a:
        for sa, sb in zip(a[name].segments, b[name].segments):
            assert torch.equal(sa.qweight.view(torch.uint8), sb.qweight.view(torch.uint8))
            assert torch.equal(sa.scales, sb.scales)
    dummy = quantized_linears(build(dense_dir, quantization="fp8_block", load_format="dummy"))
    assert all(isinstance(s, Fp8BlockWeight) for layer in dummy.values() for s in layer.segments)
