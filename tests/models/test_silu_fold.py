"""The decoder MLP's fused gate_up + SiLU-and-mul (``layers.linear.fused_silu_and_mul``): taken
at 1-2 rows where the backend offers it, never under LoRA, and greedy tokens (and logprobs) are unchanged.

The engine test runs the cpu backend (bf16) with the op added: once as the cuda backend's two
launches (its GEMV, then its SiLU-and-mul), once as its fused GEMV (``TritonOps
.linear_silu_and_mul``), both in Triton's interpreter. The MLP outputs must be the same bits,
so the greedy tokens and their logprobs are too. The model is a tiny Llama with a narrow MLP
(interpreter time).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tessellm import LLM, SamplingParams  # noqa: E402
from tessellm.backends.cpu.ops import CpuOps  # noqa: E402
from tessellm.kernels.fused_ops import TritonOps  # noqa: E402
from tessellm.layers.linear import ColumnParallelLinear, fused_silu_and_mul  # noqa: E402
from tests.conftest import _tiny_configs  # noqa: E402

# Triton on host tensors: on a GPU the same ops run in tests/kernels/test_gemv_silu.py
pytestmark = pytest.mark.interpreted

PROMPTS = [[(5 * j + 3) % 384 for j in range(11)], [(7 * j + 1) % 384 for j in range(6)]]


@pytest.fixture(scope="module")
def narrow_llama(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    config = _tiny_configs()["llama"]
    config.intermediate_size = 22  # 22 (gate, up) pairs: 22 programs a launch
    torch.manual_seed(4321)
    path = str(tmp_path_factory.mktemp("narrow-llama"))
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


def _run(path, monkeypatch, fused: bool):
    triton_ops = TritonOps()
    calls = []

    def linear_silu_and_mul(self, x, w, b=None):
        calls.append(x.shape[0])
        if fused:
            return triton_ops.linear_silu_and_mul(x, w, b)
        return triton_ops.silu_and_mul(triton_ops.linear(x, w, b))

    monkeypatch.setattr(CpuOps, "linear_silu_and_mul", linear_silu_and_mul, raising=False)
    llm = LLM(path, dtype="bfloat16", enable_prefix_caching=False)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=3)
    one = llm.generate([{"prompt_token_ids": PROMPTS[0]}], params, use_tqdm=False)  # M = 1
    two = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [(o.outputs[0].token_ids, _logprobs(o)) for o in one + two], calls


def _logprobs(out):
    return [sorted((t, lp.logprob) for t, lp in step.items()) for step in out.outputs[0].logprobs]


def test_greedy_tokens_unchanged_with_the_fused_path(narrow_llama, monkeypatch):
    monkeypatch.delenv("TESSELLM_SILU_FOLD", raising=False)  # the default: on
    want, calls_two = _run(narrow_llama, monkeypatch, fused=False)
    got, calls = _run(narrow_llama, monkeypatch, fused=True)
    assert calls == calls_two and 1 in calls and 2 in calls and max(calls) <= 2, \
        f"the MLP asked for the fused product at rows {calls}"
    assert got == want


def _gate_up(ops_like):
    layer = ColumnParallelLinear(32, [8, 8])
    torch.nn.init.normal_(layer.weight)
    layer.dense_silu_mm = getattr(ops_like, "linear_silu_and_mul", None)
    return layer


def test_fused_only_for_a_plain_gate_up_layer():
    """A backend without the op, a LoRA wrapper and a layer that is not [gate; up] keep the two
    launches (None); a plain gate_up gets the fused product, equal to the two."""
    from tessellm.backends.reference.ops import ReferenceOps
    from tessellm.lora.layers import LoRABatch, LoRALinear

    x = torch.randn(1, 32)
    assert fused_silu_and_mul(_gate_up(ReferenceOps()), x, max_rows=2) is None  # no such op
    ops = TritonOps()
    layer = _gate_up(ops)
    got = fused_silu_and_mul(layer, x, max_rows=2)
    assert got is not None and torch.equal(got, ops.silu_and_mul(layer(x)))
    assert fused_silu_and_mul(layer, torch.randn(3, 32), max_rows=2) is None  # not decode
    wrapped = LoRALinear(layer, LoRABatch(None, 2), num_slots=2, rank=4)
    assert fused_silu_and_mul(wrapped, x, max_rows=2) is None
    qkv = ColumnParallelLinear(32, [8, 4, 4])
    qkv.dense_silu_mm = ops.linear_silu_and_mul
    assert fused_silu_and_mul(qkv, x, max_rows=2) is None


def test_the_fold_is_off_when_asked(narrow_llama, monkeypatch):
    """With TESSELLM_SILU_FOLD=0 the engine never asks for the fused product, for the dense
    layer and the quantized one alike."""
    monkeypatch.setenv("TESSELLM_SILU_FOLD", "0")
    _, calls = _run(narrow_llama, monkeypatch, fused=True)
    assert calls == []
    layer = _gate_up(TritonOps())

    class Method:
        def apply_silu_and_mul(self, layer, x, bias=None):
            raise AssertionError("asked for the fused product with the fold off")

    layer.quant_method = Method()
    assert fused_silu_and_mul(layer, torch.randn(1, 32), max_rows=2) is None
