"""o_proj and the post-attention residual-add RMSNorm as one product at one row
(``layers.linear.fused_linear_add_rms_norm``, ``TESSELLM_GEMV_NORM_EPILOGUE=1``): taken only at
one row, only when asked, never under LoRA or tensor parallelism, and greedy tokens (and
logprobs) unchanged.

The engine test runs the cpu backend (bf16) with the op added: once as the cuda backend's two
launches (its GEMV, then its add-RMSNorm), once as its fused GEMV (``TritonOps
.linear_add_rms_norm``: the norm in the GEMV's last program), both in Triton's interpreter. The
outputs must be the same bits, so the greedy tokens and their logprobs are too.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tessellm import LLM, SamplingParams  # noqa: E402
from tessellm.backends.cpu.ops import CpuOps  # noqa: E402
from tessellm.kernels.fused_ops import TritonOps  # noqa: E402
from tessellm.layers.linear import RowParallelLinear, fused_linear_add_rms_norm  # noqa: E402
from tessellm.layers.norm import RMSNorm  # noqa: E402
from tests.conftest import _tiny_configs  # noqa: E402

PROMPTS = [[(5 * j + 3) % 384 for j in range(11)], [(7 * j + 1) % 384 for j in range(6)]]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    config = _tiny_configs()["llama"]
    torch.manual_seed(1234)
    path = str(tmp_path_factory.mktemp("normepi-llama"))
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


def _run(path, monkeypatch, fused: bool):
    triton_ops = TritonOps()
    calls = []

    def linear_add_rms_norm(self, x, w, residual, norm_weight, eps, b=None):
        calls.append(x.shape[0])
        if fused:
            return triton_ops.linear_add_rms_norm(x, w, residual, norm_weight, eps, b)
        return triton_ops.fused_add_rms_norm(triton_ops.linear(x, w, b), residual, norm_weight,
                                             eps)

    monkeypatch.setattr(CpuOps, "linear_add_rms_norm", linear_add_rms_norm, raising=False)
    llm = LLM(path, dtype="bfloat16", enable_prefix_caching=False)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=3)
    one = llm.generate([{"prompt_token_ids": PROMPTS[0]}], params, use_tqdm=False)  # M = 1
    two = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [(o.outputs[0].token_ids, _logprobs(o)) for o in one + two], calls


def _logprobs(out):
    return [sorted((t, lp.logprob) for t, lp in step.items()) for step in out.outputs[0].logprobs]


def test_greedy_tokens_unchanged_with_the_fused_path(tiny_llama, monkeypatch):
    monkeypatch.setenv("TESSELLM_GEMV_NORM_EPILOGUE", "1")
    want, calls_two = _run(tiny_llama, monkeypatch, fused=False)
    got, calls = _run(tiny_llama, monkeypatch, fused=True)
    assert calls == calls_two and calls and set(calls) == {1}, \
        f"the layer asked for the fused product at rows {calls}"
    assert got == want


def test_off_by_default(tiny_llama, monkeypatch):
    monkeypatch.delenv("TESSELLM_GEMV_NORM_EPILOGUE", raising=False)
    _, calls = _run(tiny_llama, monkeypatch, fused=True)
    assert calls == []


def test_fused_only_for_a_plain_one_row_layer():
    """A backend without the op, two rows, a LoRA wrapper and a norm with a reduce group keep
    the two launches (None); a plain layer at one row gets the fused product, equal to the
    two."""
    from tessellm.backends.reference.ops import ReferenceOps
    from tessellm.distributed.parallel_state import TensorParallel
    from tessellm.lora.layers import LoRABatch, LoRALinear

    tp = TensorParallel(0, 1)
    layer = RowParallelLinear(32, 16, tp=tp)
    torch.nn.init.normal_(layer.weight, std=0.2)
    layer.weight.data = layer.weight.data.bfloat16()
    x = torch.randn(1, 32).bfloat16()
    res = torch.randn(1, 16).bfloat16()
    ops = TritonOps()
    norm = RMSNorm(16, 1e-5, ops)
    norm.weight.data = torch.randn(16).bfloat16()
    assert fused_linear_add_rms_norm(layer, x, res.clone(), RMSNorm(16, 1e-5, ReferenceOps())) \
        is None  # no such op
    got = fused_linear_add_rms_norm(layer, x, res.clone(), norm)
    want = ops.fused_add_rms_norm(ops.linear(x, layer.weight), res.clone(), norm.weight, 1e-5)
    assert got is not None and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert fused_linear_add_rms_norm(layer, torch.cat([x, x]), torch.cat([res, res]),
                                     norm) is None  # not batch-1 decode
    wrapped = LoRALinear(layer, LoRABatch(None, 2), num_slots=2, rank=4)
    assert fused_linear_add_rms_norm(wrapped, x, res.clone(), norm) is None
