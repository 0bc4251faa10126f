"""The fp8 activation fold through the engine (``TESSELLM_FP8_ACT_FOLD``): a tiny random Llama
with ``quantization="fp8"`` gives the same greedy tokens and logprobs with the fold on and off.

The cpu backend runs the cuda backend's pieces in Triton's interpreter: its fused ops (RMSNorm,
SiLU-and-mul, and the fold's ``*_fp8`` producers) and its ``QuantOps`` with W8A16 at one row and
W8A8 above (``fp8_weight_only_max_m=1``, the Triton fp8 GEMM), so a batch-1 decode step keeps
the model-dtype path and prefill and batch-2 decode take the fold. The unfused path is the op,
then ``quantize_fp8_rows`` inside ``fp8_mm``; the fold must be the same bits. A fast test checks
which layers ask for a pre-quantized input (``layers.linear.fp8_input_dtype``). Both patch the cpu
backend and run Triton on CPU tensors, so they need the interpreter; on a GPU the last test runs
the cuda backend's own fold (its Triton kernels and ``torch._scaled_mm``) instead.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import os  # noqa: E402

from tessellm import LLM, SamplingParams  # noqa: E402
from tessellm.backends.cpu import quant_ops as cpu_quant_ops  # noqa: E402
from tessellm.backends.cpu.ops import CpuOps  # noqa: E402
from tessellm.kernels.fused_ops import TritonOps  # noqa: E402
from tessellm.kernels.gemm.fp8 import quantize_fp8_rows  # noqa: E402
from tessellm.kernels.gemm.quant_ops import TritonQuantOps  # noqa: E402
from tessellm.kernels.gemm.weight_only import _fp8_w8a16_config, fp8_weight_only_gemm  # noqa: E402
from tests.conftest import _tiny_configs  # noqa: E402

PROMPTS = [[(5 * j + 3) % 384 for j in range(11)], [(7 * j + 1) % 384 for j in range(6)]]
PRODUCERS = ("rms_norm_fp8", "fused_add_rms_norm_fp8", "silu_and_mul_fp8")
interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="runs Triton on CPU tensors (TRITON_INTERPRET=1); a GPU runs the cuda variant below")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    config = _tiny_configs()["llama-sharp"]
    torch.manual_seed(8765)
    path = str(tmp_path_factory.mktemp("fp8-fold-llama"))
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


def _patch(monkeypatch, calls: list):
    """The cpu backend with the Triton ops and QuantOps (see the module docstring); ``calls``
    collects (op, rows) of every fold producer and pre-quantized product."""
    ops = TritonOps()
    for name in ("rms_norm", "fused_add_rms_norm", "silu_and_mul"):
        monkeypatch.setattr(CpuOps, name, lambda self, *a, _f=getattr(ops, name): _f(*a))
    for name in PRODUCERS:
        def producer(self, x, *a, _f=getattr(ops, name), _n=name):
            calls.append((_n, x.shape[0]))
            return _f(x, *a)
        monkeypatch.setattr(CpuOps, name, producer, raising=False)

    class Ops(TritonQuantOps):
        def __init__(self):
            super().__init__(use_scaled_mm=False, fp8_weight_only_max_m=1)

        def fp8_mm(self, x, w, bias=None):
            """W8A16 at one row on the tiled kernel, not ``gemv_fp8``: the same bits at these
            shapes, ~30x faster interpreted (the GEMV's 2-row programs were ~80% of this test).
            The GEMV has its own tests (tests/kernels); here it is which path folds."""
            if x.shape[0] <= self.fp8_weight_only_max_m:
                return fp8_weight_only_gemm(x, w, bias, config=_fp8_w8a16_config(x.shape[0]))
            return super().fp8_mm(x, w, bias)

        def fp8_mm_prequantized(self, xa, w, bias=None):
            calls.append(("fp8_mm_prequantized", xa.shape[0]))
            return super().fp8_mm_prequantized(xa, w, bias)

    monkeypatch.setattr(cpu_quant_ops, "CpuQuantOps", Ops)


def _run(path, monkeypatch, fold: bool):
    monkeypatch.setenv("TESSELLM_FP8_ACT_FOLD", "1" if fold else "0")
    calls = []
    _patch(monkeypatch, calls)
    llm = LLM(path, dtype="bfloat16", quantization="fp8", enable_prefix_caching=False)
    # decode at M = 2, then at M = 1 once the shorter request is done (one step: each M = 1
    # step is eight interpreted W8A16 launches)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=3)
              for n in (3, 2)]
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [(o.outputs[0].token_ids, _logprobs(o)) for o in outs], calls


def _logprobs(out):
    return [sorted((t, lp.logprob) for t, lp in step.items()) for step in out.outputs[0].logprobs]


def _assert_fold_calls(calls, layers: int, min_rows: int) -> None:
    """Every forward above ``min_rows`` rows folded every layer (its two norms and its SiLU,
    three pre-quantized products), and no forward at or below it did."""
    rows = {r for _, r in calls}
    assert rows and min(rows) > min_rows, f"folded at rows {sorted(rows)}"
    for m in rows:
        names = [n for n, r in calls if r == m]
        forwards = names.count("rms_norm_fp8")  # layer 0's input norm: no residual yet
        assert forwards and names.count("fused_add_rms_norm_fp8") == (2 * layers - 1) * forwards
        assert names.count("silu_and_mul_fp8") == layers * forwards
        assert names.count("fp8_mm_prequantized") == 3 * layers * forwards


@interpreted
def test_greedy_tokens_unchanged_with_the_fold(tiny_llama, monkeypatch):
    want, off_calls = _run(tiny_llama, monkeypatch, fold=False)
    got, calls = _run(tiny_llama, monkeypatch, fold=True)
    assert off_calls == [], "the fold ran with TESSELLM_FP8_ACT_FOLD=0"
    assert got == want
    rows = {r for _, r in calls}
    assert 2 in rows and max(rows) > 2, f"folded at rows {sorted(rows)}"
    _assert_fold_calls(calls, _tiny_configs()["llama-sharp"].num_hidden_layers, 1)


def _fp8_layer(output_sizes, ops, scheme="fp8", bias=False):
    from tessellm.backends.spec import QuantSpec
    from tessellm.layers.linear import ColumnParallelLinear
    from tessellm.quantization import make_quant_method

    method = make_quant_method(QuantSpec(scheme, dtype=torch.bfloat16), ops)
    layer = ColumnParallelLinear(32, output_sizes, bias=bias, quant_method=method)
    if bias:
        torch.nn.init.normal_(layer.bias)
    method.quantize_dense(layer, torch.randn(sum(output_sizes), 32) * 0.1)
    method.process_weights_after_loading(layer)
    return layer


@interpreted
def test_which_layers_take_a_prequantized_input():
    """An fp8 linear on its W8A8 path asks for e4m3 input; not at the W8A16 rows, not under a
    LoRA wrapper, not for another scheme, not where the QuantOps lacks the pre-quantized product;
    and its product of that input is ``fp8_mm``'s."""
    from tessellm.backends.reference.quant_ops import TorchQuantOps
    from tessellm.layers.linear import fp8_input_dtype
    from tessellm.lora.layers import LoRABatch, LoRALinear
    from tessellm.quantization.packed import Fp8Activation

    ops = TritonQuantOps(use_scaled_mm=False)  # W8A16 up to 32 rows
    layer = _fp8_layer([16, 16], ops, bias=True)  # LoRALinear wants a parameter
    assert fp8_input_dtype(layer, 33) == torch.float8_e4m3fn
    assert fp8_input_dtype(layer, 32) is None and fp8_input_dtype(None, 33) is None
    x = torch.randn(33, 32).to(torch.bfloat16)
    xa = Fp8Activation(*quantize_fp8_rows(x, torch.float8_e4m3fn, keepdim=True), x.dtype)
    assert torch.equal(layer(xa), layer(x))  # fp8_mm quantizes x with quantize_fp8_rows
    assert fp8_input_dtype(LoRALinear(layer, LoRABatch(None, 2), num_slots=2, rank=4), 33) is None
    assert fp8_input_dtype(_fp8_layer([16], ops, "int8"), 33) is None

    class NoPrequantized(TorchQuantOps):
        fp8_mm_prequantized = None

    assert fp8_input_dtype(_fp8_layer([16], NoPrequantized()), 33) is None
    assert fp8_input_dtype(_fp8_layer([16], TorchQuantOps()), 1) == torch.float8_e4m3fn


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cuda backend's fold needs a GPU")
def test_greedy_tokens_unchanged_with_the_fold_on_cuda(tiny_llama, monkeypatch):
    """The cuda backend as served (its Triton fold kernels, ``torch._scaled_mm`` where it runs):
    prompts of 40 and 37 tokens put prefill above ``FP8_WEIGHT_ONLY_MAX_M`` (W8A8, folded) and
    decode at two rows below it (W8A16, not folded); tokens and logprobs equal fold off."""
    from tessellm.kernels.gemm.quant_ops import FP8_WEIGHT_ONLY_MAX_M

    prompts = [[(5 * j + 3) % 384 for j in range(40)], [(7 * j + 1) % 384 for j in range(37)]]
    # The unpatched kernels, bound once: a second run wrapping the first run's wrappers would
    # also record into the first run's list (the first GPU run of this test failed that way).
    producers = {name: getattr(TritonOps, name) for name in PRODUCERS}
    prequantized_mm = TritonQuantOps.fp8_mm_prequantized

    def run(fold: bool):
        monkeypatch.setenv("TESSELLM_FP8_ACT_FOLD", "1" if fold else "0")
        calls = []
        for name, f in producers.items():
            def producer(self, x, *a, _f=f, _n=name):
                calls.append((_n, x.shape[0]))
                return _f(self, x, *a)
            monkeypatch.setattr(TritonOps, name, producer)

        def prequantized(self, xa, w, bias=None):
            calls.append(("fp8_mm_prequantized", xa.qx.shape[0]))
            return prequantized_mm(self, xa, w, bias)

        monkeypatch.setattr(TritonQuantOps, "fp8_mm_prequantized", prequantized)
        llm = LLM(tiny_llama, device="cuda", dtype="bfloat16", quantization="fp8",
                  enable_prefix_caching=False, enforce_eager=True)
        calls.clear()  # start-up runs the fp8 producers once (16384 rows) with the fold off too
        params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=3)
                  for n in (4, 2)]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        del llm
        return [(o.outputs[0].token_ids, _logprobs(o)) for o in outs], calls

    want, off_calls = run(fold=False)
    got, calls = run(fold=True)
    assert off_calls == [], "the fold ran with TESSELLM_FP8_ACT_FOLD=0"
    assert got == want
    _assert_fold_calls(calls, _tiny_configs()["llama-sharp"].num_hidden_layers,
                       FP8_WEIGHT_ONLY_MAX_M)
