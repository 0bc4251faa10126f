"""MXFP4 expert weights (gpt-oss's released checkpoints), dequantized at load: the decoder
against a hand-built reference that reads each code's sign, exponent and mantissa bits (no
table), and a tiny gpt-oss whose experts are stored as MXFP4 blocks serving HF's greedy tokens
and log-probabilities of the same weights stored dense."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tessellm.quantization.mxfp4 import dequantize_mxfp4
from tests.models.test_gpt_oss import save_gpt_oss
from tests.models.variant_parity import edit_config, hf_reference, ours, prompts


def _e2m1(code: int) -> float:
    """FP4 E2M1 by its bits: sign, 2 exponent bits (bias 1), 1 mantissa bit; exponent 0 is
    subnormal (0 or 0.5)."""
    sign = -1.0 if code & 0b1000 else 1.0
    exp, man = (code >> 1) & 0b11, code & 1
    return sign * (man * 0.5 if exp == 0 else (1.0 + man / 2) * 2.0 ** (exp - 1))


def _reference(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    *prefix, groups, half = blocks.shape
    out = torch.empty(*prefix, groups * 2 * half, dtype=torch.float64)
    flat_b, flat_s, flat_o = blocks.reshape(-1, groups, half), scales.reshape(-1, groups), \
        out.view(-1, groups * 2 * half)
    for r in range(flat_b.shape[0]):
        for g in range(groups):
            factor = 2.0 ** (int(flat_s[r, g]) - 127)
            for j in range(half):
                byte = int(flat_b[r, g, j])
                flat_o[r, g * 32 + 2 * j] = _e2m1(byte & 0xF) * factor
                flat_o[r, g * 32 + 2 * j + 1] = _e2m1(byte >> 4) * factor
    return out


def test_dequantize_matches_bitwise_reference():
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 5, 2, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(100, 150, (3, 5, 2), dtype=torch.uint8, generator=gen)
    want = _reference(blocks, scales)
    got = dequantize_mxfp4(blocks, scales, torch.float32)
    assert got.shape == (3, 5, 64)
    assert torch.equal(got.double(), want)  # exact: E2M1 times powers of two
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.bfloat16).double(), want)


def test_dequantize_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="do not match"):
        dequantize_mxfp4(torch.zeros(2, 3, 16, dtype=torch.uint8),
                         torch.zeros(2, 4, dtype=torch.uint8))


def _to_mxfp4(path: str) -> str:
    """Replace the dense experts of the gpt-oss at ``path`` by random MXFP4 blocks and write,
    next to it, ``path + '-mxfp4'`` holding those blocks (``path`` keeps them dense, decoded
    by the bitwise reference, for HF)."""
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    dense = load_file(file)
    packed = dict(dense)
    gen = torch.Generator().manual_seed(1)
    for name in list(dense):
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            continue
        e, inner, outer = dense[name].shape  # HF: [E, in, out]
        blocks = torch.randint(0, 256, (e, outer, inner // 32, 16), dtype=torch.uint8,
                               generator=gen)
        scales = torch.randint(123, 127, (e, outer, inner // 32), dtype=torch.uint8,
                               generator=gen)
        dense[name] = _reference(blocks, scales).float().transpose(1, 2).contiguous()
        del packed[name]
        packed[name + "_blocks"], packed[name + "_scales"] = blocks, scales
    save_file(dense, file, metadata={"format": "pt"})
    qpath = path + "-mxfp4"
    os.makedirs(qpath)
    save_file(packed, os.path.join(qpath, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": None}
    with open(os.path.join(qpath, "config.json"), "w") as f:
        json.dump(config, f)
    return qpath


def test_mxfp4_checkpoint_serves_hf_tokens_of_its_dense_weights(tmp_path):
    """Experts read as MXFP4 blocks and dequantized at load give HF's tokens and logprobs on
    the same weights stored dense (hidden 64: two blocks a row of gate_up, one of down)."""
    path = save_gpt_oss(str(tmp_path / "g"), hidden_size=64, intermediate_size=32)
    qpath = _to_mxfp4(path)


    ps = prompts((9, 20))
    want_tokens, want_lp = hf_reference(path, ps, 6, "eager")
    got_tokens, got_lp = ours(qpath, ps, 6, max_num_batched_tokens=8)
    assert got_tokens == want_tokens
    for got, want in zip(got_lp, want_lp):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=0)


def test_mxfp4_on_another_architecture_refused(tmp_path):
    """Only gpt-oss dequantizes MXFP4 experts at load; another model says what to do."""
    from tessellm import LLM
    from tests.models.variant_parity import TINY, save_tiny
    from transformers import LlamaConfig

    path = save_tiny(LlamaConfig(**TINY), str(tmp_path / "llama"))
    edit_config(path, quantization_config={"quant_method": "mxfp4"})
    with pytest.raises(ValueError, match=r"MXFP4 checkpoints .*supported for gpt-oss only.*"
                                         r"Mxfp4Config\(dequantize=True\)"):
        LLM(path, dtype="float32")
