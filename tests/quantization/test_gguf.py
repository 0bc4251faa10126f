"""GGUF blocks kept quantized: every value equals what the ``gguf`` package dequantizes.

Segments built from raw llama.cpp blocks are checked bit for bit against
``gguf.quants.dequantize`` (Q8_0/Q4_0/Q4_1 from ``gguf.quants.quantize``; Q4_K/Q6_K, which
that package cannot quantize, from random blocks with sane scales), then multiplied by both
backends' ops, and finally the bundled SmolLM2 Q4_1 file is loaded with ``quantization="gguf"``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from tessellm.backends.reference.quant_ops import TorchQuantOps  # noqa: E402
from tessellm.loader.gguf_loader import iter_gguf_weights  # noqa: E402
from tessellm.quantization.gguf import segment_from_blocks  # noqa: E402
from tests.gpu_set import gpu_when_present  # noqa: E402

Q = gguf.GGMLQuantizationType
ROWS, K = 24, 512


def _blocks(qtype: Q, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1):
        values = rng.standard_normal((ROWS, K)).astype(np.float32) * 0.05
        return gguf.quants.quantize(values, qtype)
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, (ROWS, K // 256, block_bytes), dtype=np.uint8)
    # the fp16 super-block scales: small positive normal numbers, never inf/NaN
    halves = rng.uniform(1e-4, 1e-2, (ROWS, K // 256, 2)).astype(np.float16).view(np.uint8)
    if qtype == Q.Q4_K:  # d, dmin at bytes 0..3
        raw[..., 0:4] = halves.reshape(ROWS, K // 256, 4)
    else:  # Q6_K: d at the last two bytes
        raw[..., -2:] = halves[..., :2]
    return raw.reshape(ROWS, -1)


QTYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K]


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_segment_dequantizes_bit_exactly(qtype):
    raw = _blocks(qtype)
    want = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(ROWS, K))
    seg = segment_from_blocks(qtype, raw, (ROWS, K))
    got = seg.dequantize(torch.float32)
    assert torch.equal(got, want)
    file_bytes = raw.nbytes
    held = sum(b.nbytes for b in seg.buffers())
    assert held <= file_bytes * {Q.Q4_K: 1.34, Q.Q6_K: 1.53}.get(qtype, 1.0)


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("ops", ["torch", "triton"])
@gpu_when_present
def test_segment_gemm(qtype, ops):
    if ops == "triton":
        pytest.importorskip("triton")
        from tessellm.kernels.gemm.quant_ops import TritonQuantOps

        impl = TritonQuantOps()
    else:
        impl = TorchQuantOps()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seg = segment_from_blocks(qtype, _blocks(qtype, seed=1), (ROWS, K)).to(dev)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(2)).to(dev)
    out = getattr(impl, f"{seg.kind}_mm")(x, seg)
    ref = x @ seg.dequantize(torch.float32).t()
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.fixture(scope="module")
def bundled_gguf_engine(bundled_model):
    from tessellm.entrypoints.llm import LLM

    return LLM(bundled_model, quantization="gguf", dtype="float32", max_model_len=256, num_kv_blocks=64,
               max_num_seqs=4)


def test_bundled_model_linears_stay_quantized_and_exact(bundled_gguf_engine, bundled_model):
    """Every linear layer holds int4/int8 segments whose values equal the dequantizing loader's
    weights bit for bit (q/k un-permutation included), in the file's own number of bytes."""
    from tessellm.quantization.loading import quantized_linears

    model = bundled_gguf_engine.engine.core.runner.model
    layers = quantized_linears(model)
    assert len(layers) == 4 * model.config.num_hidden_layers
    dense = dict(iter_gguf_weights(bundled_model, torch.float32))
    checked = 0
    for name, layer in layers.items():
        assert all(seg.kind in ("int4", "int8") for seg in layer.segments), name
        got = torch.cat([seg.dequantize(torch.float32).cpu() for seg in layer.segments])
        if name.endswith("qkv_proj"):
            parts = [dense[f"model.{name.replace('qkv_proj', p)}.weight"] for p in ("q_proj", "k_proj", "v_proj")]
        elif name.endswith("gate_up_proj"):
            parts = [dense[f"model.{name.replace('gate_up_proj', p)}.weight"] for p in ("gate_proj", "up_proj")]
        else:
            parts = [dense[f"model.{name}.weight"]]
        assert torch.equal(got, torch.cat(parts)), name
        checked += 1
    assert checked == len(layers)
    # Q4_1: 20 bytes per 32 weights, exactly as in the file
    linear_bytes = sum(b.nbytes for layer in layers.values() for b in layer.segments.buffers())
    linear_params = sum(layer.output_size * layer.input_size for layer in layers.values())
    assert linear_bytes == linear_params // 32 * 20


def test_bundled_model_generates_like_the_dequantized_one(bundled_gguf_engine, bundled_model):
    from tessellm.core.sampling_params import SamplingParams
    from tessellm.entrypoints.llm import LLM

    params = SamplingParams(max_tokens=12, temperature=0)
    prompts = ["The capital of France is", "def add(a, b):"]
    dense = LLM(bundled_model, dtype="float32", max_model_len=256, num_kv_blocks=64, max_num_seqs=4)
    dense = dense.generate(prompts, params)
    quant = bundled_gguf_engine.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in quant] == [o.outputs[0].token_ids for o in dense]
