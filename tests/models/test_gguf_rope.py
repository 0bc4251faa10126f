"""GGUF RoPE scaling: llama.cpp stores Llama 3.1/3.2's llama3 scaling as per-frequency divisors
(``rope_freqs.weight``); loading turns them into the equivalent HF ``rope_scaling`` (whose HF
parity test_config_variants.py and test_parity.py check), and our rotary then applies exactly
the file's divisors. Factors that are not llama3's, and scaling of other kinds, are refused."""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch

from tessellm.backends.reference.ops import ReferenceOps
from tessellm.layers.rotary import RotaryEmbedding
from tessellm.loader.gguf_loader import iter_gguf_weights, load_gguf_config

HEAD_DIM, THETA = 16, 500000.0


def converter_factors(factor: float, low=1.0, high=4.0, old_len=8192) -> list[float]:
    """What llama.cpp's convert_hf_to_gguf.py writes for a llama3 rope_scaling (its formula,
    in Python floats)."""
    out = []
    for i in range(0, HEAD_DIM, 2):
        wavelen = 2 * math.pi * THETA ** (i / HEAD_DIM)
        if wavelen < old_len / high:
            out.append(1.0)
        elif wavelen > old_len / low:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def write_gguf(path, arch: str, rope_freqs=None, metadata=None) -> str:
    rng = np.random.default_rng(0)
    hidden, ffn = 64, 96
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_vocab_size(64), writer.add_context_length(256), writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn), writer.add_block_count(1), writer.add_head_count(4)
    writer.add_head_count_kv(2), writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(THETA), writer.add_layer_norm_rms_eps(1e-6)
    for key, value in (metadata or {}).items():
        writer.add_string(key, value) if isinstance(value, str) else writer.add_float32(key, value)
    shapes = {"token_embd.weight": (64, hidden), "output_norm.weight": (hidden,)}
    for part, shape in [("attn_q", (hidden, hidden)), ("attn_k", (32, hidden)),
                        ("attn_v", (32, hidden)), ("attn_output", (hidden, hidden)),
                        ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)),
                        ("ffn_down", (hidden, ffn)), ("attn_norm", (hidden,)),
                        ("ffn_norm", (hidden,))]:
        shapes[f"blk.0.{part}.weight"] = shape
    for name, shape in shapes.items():
        writer.add_tensor(name, rng.standard_normal(shape, dtype=np.float32))
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    return str(path)


@pytest.mark.parametrize("arch, factor", [("llama", 8.0), ("llama", 32.0),  # Llama 3.1, 3.2
                                          ("exaone", 8.0)])  # EXAONE 3.5: its converter's too
def test_llama3_rope_freqs_become_llama3_scaling(tmp_path, arch, factor):
    divisors = converter_factors(factor)
    path = write_gguf(tmp_path / "llama3.gguf", arch, rope_freqs=divisors)
    config = load_gguf_config(path)
    params = config.rope_parameters
    assert (params["rope_type"], params["factor"], params["original_max_position_embeddings"]) == (
        "llama3", factor, 8192)
    # Our cache rotates by the base frequencies divided by the file's divisors, as llama.cpp does.
    cache = RotaryEmbedding.from_config(config, HEAD_DIM, ReferenceOps()).cos_sin_cache
    inv_freq = 1.0 / (THETA ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    angles = torch.outer(torch.arange(256).float(), inv_freq / torch.tensor(divisors))
    torch.testing.assert_close(cache, torch.cat((angles.cos(), angles.sin()), -1),
                               rtol=0, atol=2e-4)
    assert "rope_freqs.weight" not in {n for n, _ in iter_gguf_weights(path, torch.float32)}


@pytest.mark.parametrize("arch, freqs, metadata, message", [
    ("llama", [2.0] * (HEAD_DIM // 2), {}, "rope_freqs.weight holds RoPE frequency factors that "
                                           "are not Llama 3's"),
    ("qwen2", converter_factors(8.0), {}, "rope_freqs.weight in a 'qwen2' file is not supported"),
    ("llama", None, {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0},
     "rope.scaling.type 'yarn' in a 'llama' file is not supported"),
])
def test_other_gguf_rope_scaling_refused(tmp_path, arch, freqs, metadata, message):
    path = write_gguf(tmp_path / "x.gguf", arch, rope_freqs=freqs, metadata=metadata)
    with pytest.raises(ValueError, match=message):
        load_gguf_config(path)


def test_linear_gguf_rope_scaling(tmp_path):
    path = write_gguf(tmp_path / "linear.gguf", "llama", metadata={
        "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
    params = load_gguf_config(path).rope_parameters
    assert (params["rope_type"], params["factor"]) == ("linear", 4.0)
    # Gemma 3 4B-27B: linear factor 8 on the global layers only (was refused)
    path = write_gguf(tmp_path / "gemma3.gguf", "gemma3", metadata={
        "gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0})
    params = load_gguf_config(path).rope_parameters
    assert params["full_attention"]["rope_type"] == "linear"
    assert params["full_attention"]["factor"] == 8.0
    assert params["sliding_attention"]["rope_type"] == "default"
