"""o_proj and the post-attention residual-add RMSNorm as one product at one row, and down_proj
with the next layer's input norm (or the final norm), handed to that norm module
(``layers.linear.fused_linear_add_rms_norm``, ``models.decoder.link_norm_epilogues``,
``TESSELLM_GEMV_NORM_EPILOGUE=1``): taken only at one row, only when asked, never under LoRA or
tensor parallelism, and greedy tokens (and logprobs) unchanged.

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
from tests.gpu_set import gpu_when_present  # noqa: E402

PROMPTS = [[(5 * j + 3) % 384 for j in range(11)], [(7 * j + 1) % 384 for j in range(6)]]


def _save(tmp_path_factory, family):
    from transformers import AutoModelForCausalLM

    config = _tiny_configs()[family]
    torch.manual_seed(1234)
    path = str(tmp_path_factory.mktemp(f"normepi-{family}"))
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return _save(tmp_path_factory, "llama")


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def tiny_family(tmp_path_factory, request):
    """Llama, and Qwen3 (q/k norms in the attention's projection, tied embeddings' cousin)."""
    return _save(tmp_path_factory, request.param)


def _run(path, monkeypatch, fused: bool):
    triton_ops = TritonOps()
    calls = []

    def linear_add_rms_norm(self, x, w, residual, norm_weight, eps, b=None):
        calls.append((x.shape[0], w.data_ptr()))  # which weight: each layer's o_proj, down_proj
        if fused:
            return triton_ops.linear_add_rms_norm(x, w, residual, norm_weight, eps, b)
        return triton_ops.fused_add_rms_norm(triton_ops.linear(x, w, b), residual, norm_weight,
                                             eps)

    monkeypatch.setattr(CpuOps, "linear_add_rms_norm", linear_add_rms_norm, raising=False)
    llm = LLM(path, dtype="bfloat16", device="cpu", enable_prefix_caching=False)
    return _generate(llm), calls


def _generate(llm, max_tokens=3):
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=3)
    one = llm.generate([{"prompt_token_ids": PROMPTS[0]}], params, use_tqdm=False)  # M = 1
    two = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    llm.shutdown()
    return [(o.outputs[0].token_ids, _logprobs(o)) for o in one + two]


def _logprobs(out):
    return [sorted((t, lp.logprob) for t, lp in step.items()) for step in out.outputs[0].logprobs]


CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(),
                              reason="Triton's interpreter on the cpu backend; the GPU has its own test")


@CPU_ONLY
def test_greedy_tokens_unchanged_with_the_fused_path(tiny_family, monkeypatch):
    monkeypatch.setenv("TESSELLM_GEMV_NORM_EPILOGUE", "1")
    want, calls_two = _run(tiny_family, monkeypatch, fused=False)
    got, calls = _run(tiny_family, monkeypatch, fused=True)
    rows = [r for r, _ in calls]
    assert rows == [r for r, _ in calls_two] and rows and set(rows) == {1}, \
        f"the layer asked for the fused product at rows {calls}"
    weights = [w for _, w in calls]
    layers = _tiny_configs()["llama"].num_hidden_layers
    assert len(set(weights)) == 2 * layers and len({weights.count(w) for w in weights}) == 1, \
        "each layer's o_proj and down_proj fused, as often"
    assert got == want
    # against the engine without the path at all (the cpu backend's own ops: other kernels,
    # so the logprobs only close): the hand-off of down_proj's norm to the next layer and to
    # the final norm computes what the unfused layers do
    monkeypatch.setenv("TESSELLM_GEMV_NORM_EPILOGUE", "0")
    plain, none = _run(tiny_family, monkeypatch, fused=True)
    assert none == []
    for (tokens, lps), (want_tokens, want_lps) in zip(got, plain):
        assert tokens == want_tokens
        for step, want_step in zip(lps, want_lps):
            assert [t for t, _ in step] == [t for t, _ in want_step]
            for (_, lp), (_, want_lp) in zip(step, want_step):
                assert abs(lp - want_lp) < 0.05


@CPU_ONLY
def test_off_by_default(tiny_llama, monkeypatch):
    monkeypatch.delenv("TESSELLM_GEMV_NORM_EPILOGUE", raising=False)
    _, calls = _run(tiny_llama, monkeypatch, fused=True)
    assert calls == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cuda backend's kernels on a GPU")
@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_cuda_same_bits_with_the_epilogue(tiny_llama, monkeypatch, quantization):
    """On the cuda backend (bf16, CUDA graphs, PDL), with TESSELLM_GEMV_NORM_EPILOGUE off and
    on: the fused kernel runs (counted) and greedy tokens and logprobs are the same bits.
    TESSELLM_NORM_FOLD2=0 in both runs: the epilogue is bitwise the GEMV and the add-RMSNorm
    launch (``gemm/norm_epilogue.py``), not the norm fold, which the cuda backend takes by
    default for dense bf16 (``models.decoder.norm_fold2_on``) and which rounds the activation
    once instead of twice (``gemm/norm_fold.py``: not bitwise the unfused pair)."""
    from tessellm.kernels import fused_ops
    from tessellm.kernels.gemm import quant_ops

    calls = []
    for mod, name in ((fused_ops, "gemv_then_add_rms_norm"),
                      (quant_ops, "gemv_fp8_x2_then_add_rms_norm")):
        def counted(*a, _f=getattr(mod, name), **kw):
            calls.append(1)
            return _f(*a, **kw)
        monkeypatch.setattr(mod, name, counted)
    kw = dict(dtype="bfloat16", enable_prefix_caching=False, quantization=quantization,
              max_num_seqs=4)
    monkeypatch.setenv("TESSELLM_NORM_FOLD2", "0")
    monkeypatch.delenv("TESSELLM_GEMV_NORM_EPILOGUE", raising=False)
    want = _generate(LLM(tiny_llama, **kw), max_tokens=8)
    assert not calls
    monkeypatch.setenv("TESSELLM_GEMV_NORM_EPILOGUE", "1")
    got = _generate(LLM(tiny_llama, **kw), max_tokens=8)
    assert calls, "the fused kernel never ran"
    assert got == want


@gpu_when_present
def test_fused_only_for_a_plain_one_row_layer():
    """A backend without the op, two rows, a LoRA wrapper and a norm with a reduce group keep
    the two launches (None); a plain layer at one row gets the fused product, equal to the
    two."""
    from tessellm.backends.reference.ops import ReferenceOps
    from tessellm.distributed.parallel_state import TensorParallel
    from tessellm.lora.layers import LoRABatch, LoRALinear

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tp = TensorParallel(0, 1)
    layer = RowParallelLinear(32, 16, tp=tp).to(dev)
    torch.nn.init.normal_(layer.weight, std=0.2)
    layer.weight.data = layer.weight.data.bfloat16()
    x = torch.randn(1, 32).bfloat16().to(dev)
    res = torch.randn(1, 16).bfloat16().to(dev)
    ops = TritonOps()
    norm = RMSNorm(16, 1e-5, ops).to(dev)
    norm.weight.data = torch.randn(16).bfloat16().to(dev)
    assert fused_linear_add_rms_norm(layer, x, res.clone(), RMSNorm(16, 1e-5, ReferenceOps())) \
        is None  # no such op
    got = fused_linear_add_rms_norm(layer, x, res.clone(), norm)
    want = ops.fused_add_rms_norm(ops.linear(x, layer.weight), res.clone(), norm.weight, 1e-5)
    assert got is not None and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert fused_linear_add_rms_norm(layer, torch.cat([x, x]), torch.cat([res, res]),
                                     norm) is None  # not batch-1 decode
    wrapped = LoRALinear(layer, LoRABatch(None, 2), num_slots=2, rank=4).to(dev)
    assert fused_linear_add_rms_norm(wrapped, x, res.clone(), norm) is None


@gpu_when_present
def test_eagle_stream_reads_the_handed_off_residual():
    """EAGLE-3 reads the residual stream entering a layer (``_stream_into``): after a hand-off
    (the layer before added its down_proj output into the residual and normed it) that is the
    residual itself, as a copy; otherwise hidden + residual as before."""
    from types import SimpleNamespace

    from tessellm.models.llama import LlamaForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    norm = RMSNorm(8, 1e-5, TritonOps()).to(dev)
    model = SimpleNamespace(layers=[SimpleNamespace(input_layernorm=norm)])
    hidden, residual = torch.randn(1, 8, device=dev), torch.randn(1, 8, device=dev)
    assert torch.equal(LlamaForCausalLM._stream_into(model, 0, hidden, residual), hidden + residual)
    norm.hand_off(hidden, residual)
    got = LlamaForCausalLM._stream_into(model, 0, hidden, residual)
    assert torch.equal(got, residual) and got.data_ptr() != residual.data_ptr()
    assert norm(hidden, residual) == (hidden, residual)  # the hand-off, then consumed
    assert norm._handoff is None
    norm.hand_off(hidden, residual)  # a call with other tensors drops it and computes
    other = residual.clone()
    out, res = norm(hidden.clone(), other)
    assert norm._handoff is None and res is not residual
    want = TritonOps().fused_add_rms_norm(hidden.clone(), residual.clone(), norm.weight, 1e-5)
    assert torch.equal(out, want[0])
