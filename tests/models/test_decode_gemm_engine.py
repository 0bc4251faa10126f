"""``TESSELLM_DECODE_GEMM=1`` in the whole engine: a tiny Llama on the cuda backend (on a GPU,
with its captured decode graphs; else emulated, Triton in the interpreter on host tensors) takes
the tile GEMM for its dense linears and the gate_up + SiLU-and-mul product at 3+ rows (batched
decodes of four sequences, prefill chunks) and keeps HF's greedy tokens and log-probabilities in
float32."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("transformers")

from tests.models.variant_parity import assert_parity, prompts  # noqa: E402

ON_GPU = torch.cuda.is_available()
# ~2 min in the interpreter on 2 cores: slow there (tests/kernels/test_decode_gemm.py covers the
# kernels and the ops' routing by default); in the default suite on a GPU
pytestmark = [pytest.mark.gpu] if ON_GPU else [pytest.mark.slow]


def test_decode_gemm_keeps_hf_parity(tmp_path, monkeypatch):
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    from tessellm.kernels import fused_ops as fo
    from tessellm.testing.harness import save_tiny_llama

    monkeypatch.setenv("TESSELLM_DECODE_GEMM", "1")
    calls = {"plain": 0, "silu": 0}
    plain, dual = fo.decode_gemm, fo.decode_gemm_silu_and_mul

    def count(kind, fn):
        def wrapped(*args):
            calls[kind] += 1
            return fn(*args)
        return wrapped

    monkeypatch.setattr(fo, "decode_gemm", count("plain", plain))
    monkeypatch.setattr(fo, "decode_gemm_silu_and_mul", count("silu", dual))
    path = save_tiny_llama(str(tmp_path))
    engine = dict(device="cuda", block_size=16, num_kv_blocks=64, max_model_len=128,
                  max_num_seqs=4, max_num_batched_tokens=32)
    if not ON_GPU:
        engine.update(emulate=True)
    # four sequences decode together (4 rows); the 40-token prompt is chunked (32 + 8 + ...)
    assert_parity(path, prompts((5, 40, 9, 13)), max_new=6, **engine)
    assert calls["plain"] > 0 and calls["silu"] > 0
