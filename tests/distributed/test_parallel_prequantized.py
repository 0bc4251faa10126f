"""Tensor parallelism of pre-quantized checkpoints: fp8 with its scales, AWQ/GPTQ int4, GGUF
blocks, split as stored (``quantization/sharding.py``), on the CPU with real gloo workers.

Two checks per format:

* every rank's packed segments dequantize to exactly its rows (column-parallel) or columns
  (row-parallel) of the one-device model's weights (bit for bit: nothing is requantized);
* the engine at T=2 (T=3 for the bundled SmolLM2, whose 9 heads do not split in two) gives the
  one-device engine's greedy tokens, and its log-probabilities up to float32 summation order:
  a row-parallel layer sums its ranks' partial products with an all-reduce, in another order
  than one device's GEMM, so the logprobs agree to ~1e-5, not bit for bit.

fp8 is W8A8: activations are quantized per token over the inputs a rank holds, so a row-parallel
rank's activation scales are its own K/2 columns' (as in vLLM), and T=2 is not the T=1 math; its
end-to-end check is therefore against the dequantized checkpoint (see the test).

The checkpoints are made with the project's own quantizers (``packed.quantize_int4`` round to
nearest in the AWQ/GPTQ layouts; ``packed.quantize_fp8`` through ``test_loading``'s fp8
writer) from the tiny sharp llama, so greedy choices are decisive; int4 runs on the cuda
backend's Triton kernels, emulated on host tensors (ranks over gloo).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from tessellm.backends.registry import BackendRegistry
from tessellm.config import resolve_model
from tessellm.distributed.parallel_state import TensorParallel
from tessellm.loader.model_loader import build_model
from tessellm.quantization.int4 import pack_awq, pack_gptq_zeros
from tessellm.quantization.loading import quantized_linears
from tessellm.quantization.packed import pack_int4, quantize_int4
from tests.models.variant_parity import ours
from tests.quantization.test_loading import _fp8_checkpoint, _linear_names, _write

PROMPTS = [[5, 17, 42, 99, 3, 250], [7, 7, 7], list(range(40, 80)), [300, 12]]


# -- checkpoints ------------------------------------------------------------------------------


def int4_checkpoint(dense_dir: str, path: str, fmt: str, group: int) -> str:
    """Round-to-nearest int4 of every linear: AWQ asymmetric, GPTQ symmetric (v1: zero - 1);
    ``group`` -1: one group over all inputs (per channel)."""
    state = load_file(os.path.join(dense_dir, "model.safetensors"))
    quant = dict(state)
    for name in _linear_names(state):
        w = quant.pop(f"{name}.weight")
        q, scales, zeros = quantize_int4(w, w.shape[1] if group == -1 else group,
                                         symmetric=fmt == "gptq")
        if fmt == "awq":
            quant.update({f"{name}.qweight": pack_awq(q), f"{name}.qzeros": pack_awq(zeros)})
        else:
            quant.update({f"{name}.qweight": pack_int4(q),
                          f"{name}.qzeros": pack_gptq_zeros(zeros - 1),
                          f"{name}.g_idx": torch.zeros(w.shape[1], dtype=torch.int32) if group == -1
                          else (torch.arange(w.shape[1]) // group).to(torch.int32)})
        quant[f"{name}.scales"] = scales.half()
    config = ({"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
               "version": "gemm"} if fmt == "awq" else
              {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False,
               "sym": True, "checkpoint_format": "gptq"})
    return _write(path, quant, dense_dir, config)


# -- every rank holds its part of the one-device weights, exactly ----------------------------


def _build(path: str, backend: str, tp=None, quantization=None):
    registry = BackendRegistry()
    model, _ = build_model(resolve_model(path), "gguf" if path.endswith(".gguf") else
                           "safetensors", registry, registry.backends[backend], torch.float32,
                           torch.device("cpu"), 16, quantization=quantization, tp=tp)
    return model


def _dequantized(layer) -> torch.Tensor:
    return torch.cat([seg.dequantize() for seg in layer.segments])


def assert_ranks_hold_their_part(path: str, backend: str, tp_size: int, quantization=None,
                                 build=_build):
    """Column-parallel: each logical shard's rows of the T=1 layer (KV heads replicated where
    fewer than ranks); row-parallel: its K / T columns; compared bit for bit."""
    one = quantized_linears(build(path, backend, quantization=quantization))
    ranks = [quantized_linears(build(path, backend, TensorParallel(rank, tp_size), quantization))
             for rank in range(tp_size)]
    for layers in ranks:
        assert layers.keys() == one.keys()
    for name in one:
        full = _dequantized(one[name])  # once for all ranks (the bundled GGUF: half the time)
        for rank, layers in enumerate(ranks):
            layer = layers[name]
            if hasattr(layer, "shard_ranges"):
                parts = full.split(one[name].output_sizes)
                want = torch.cat([part[start:start + rows]
                                  for part, (start, rows) in zip(parts, layer.shard_ranges)])
            else:
                want = full[:, layer.input_start:layer.input_start + layer.input_size]
            assert torch.equal(_dequantized(layer), want), (path, rank, name)


@pytest.fixture(scope="module")
def sharp(tiny_model_dir) -> str:
    return tiny_model_dir("llama-sharp")


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_fp8_ranks_hold_their_part(sharp, tmp_path, strategy):
    """Per-tensor scales: q, k and v (gate, up) each keep their own, over their rows."""
    quant, _ = _fp8_checkpoint(sharp, tmp_path, strategy)
    assert_ranks_hold_their_part(quant, "cpu", 2)


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_int4_ranks_hold_their_part(sharp, tmp_path, fmt):
    pytest.importorskip("triton")
    assert_ranks_hold_their_part(int4_checkpoint(sharp, str(tmp_path / fmt), fmt, 32), "cuda", 2)


@pytest.fixture(scope="module")
def build_once():
    """``_build``, each (path, backend, rank, size, quantization) built once for this module:
    the two bundled-GGUF tests below read the same four SmolLM2 builds (T=1, and T=3's three
    ranks); they only read the models."""
    built = {}

    def build(path, backend, tp=None, quantization=None):
        key = (path, backend, tp and (tp.rank, tp.size), quantization)
        if key not in built:
            built[key] = _build(path, backend, tp, quantization)
        return built[key]

    yield build
    built.clear()


def test_gguf_ranks_hold_their_part(bundled, build_once):
    """SmolLM2's Q4_1 blocks (32 weights) over 3 ranks: 576 / 3 and 1536 / 3 inputs per rank."""
    assert_ranks_hold_their_part(bundled, "cpu", 3, quantization="gguf", build=build_once)


def test_gguf_lm_head_keeps_its_blocks_split(bundled, build_once):
    """The tied LM head reads token_embd's Q8_0 blocks at T=1; at T=3 each rank its 16384
    vocabulary rows of them."""
    def head(tp=None):
        model = build_once(bundled, "cpu", tp, quantization="gguf")
        return model.lm_head.quant_weight

    whole = head().dequantize()
    for rank in range(3):
        part = head(TensorParallel(rank, 3))
        assert part is not None and part.kind == "int8"  # Q8_0
        assert torch.equal(part.dequantize(), whole[rank * 16384:(rank + 1) * 16384]), rank


@pytest.fixture(scope="module")
def bundled() -> str:
    from tessellm.loader.default_model import default_model_path

    pytest.importorskip("gguf")
    try:
        return default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


# -- the engine at T > 1 equals the engine at T = 1 -------------------------------------------


def _assert_same_generation(one, many, atol: float) -> None:
    """Greedy tokens equal; the log-probabilities of prompt + continuation within ``atol``."""
    assert many[0] == one[0]
    for got, want in zip(many[1], one[1]):
        assert torch.allclose(got, want, rtol=0, atol=atol), (got - want).abs().max()


@pytest.mark.interpreted
def test_int4_tp2_generates_like_one_device(sharp, tmp_path):
    """AWQ on the cuda backend's Triton int4 kernels, emulated on host tensors at both sizes.
    Three new tokens (two decode steps of both prompts): the interpreted decode attention is
    most of this test's time, and every prompt and generated position's logprob is compared
    (a rank's wrong slice or scale moves them all)."""
    pytest.importorskip("triton")
    path = int4_checkpoint(sharp, str(tmp_path / "awq"), "awq", 32)
    run = lambda **kw: ours(path, PROMPTS[:2], 3, device="cuda", emulate=True,  # noqa: E731
                            num_kv_blocks=64, seed=0, **kw)
    _assert_same_generation(run(), run(tensor_parallel_size=2), atol=1e-4)


def test_gguf_tp3_generates_like_one_device(bundled, monkeypatch):
    """The bundled SmolLM2 (9 heads, 3 KV heads: T=3) kept in its Q4_1 blocks, on the cpu's
    float32 path (``TESSELLM_CPU_INT4PACK=0``: the bf16 int4 kernel rounds each rank's partial
    product, a difference of rounding, not of weights). Its LM head reads the file's Q8_0
    blocks at both sizes, each rank its vocabulary rows at T=3."""
    monkeypatch.setenv("TESSELLM_CPU_INT4PACK", "0")  # inherited by the spawned workers
    prompts = [[504, 3458, 282, 4649, 314], [1206, 17, 42, 99, 3, 250, 7000, 12, 9]]
    run = lambda **kw: ours(bundled, prompts, 8, device="cpu", quantization="gguf",  # noqa: E731
                            num_kv_blocks=64, seed=0, **kw)
    _assert_same_generation(run(), run(tensor_parallel_size=3), atol=1e-4)


def _prompt_logprobs(path: str, **kwargs) -> torch.Tensor:
    """Teacher-forced log-probability of each prompt token after the ones before it."""
    from tessellm import LLM, SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    with LLM(path, device="cpu", num_kv_blocks=64, seed=0, **kwargs) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return torch.tensor([pos[tok].logprob for p, o in zip(PROMPTS, outs)
                         for tok, pos in zip(p[1:], o.prompt_logprobs[1:])])


def test_fp8_tp2_as_close_to_its_weights_as_one_device(sharp, tmp_path):
    """fp8 quantizes activations per token over the inputs a rank holds, so in o_proj and
    down_proj each rank has its own activation scales (as in vLLM): T=2 is not T=1's arithmetic,
    and on this sharp model either one's greedy tokens leave the dense model's within a few
    steps. The check is on teacher-forced logprobs against the dequantized checkpoint: T=2
    deviates about as much as T=1 (a wrong slice or scale is off by several nats). Per-tensor
    scales, the case where fused q/k/v keep one scale each."""
    quant, dense = _fp8_checkpoint(sharp, tmp_path, "tensor")
    want = _prompt_logprobs(dense)
    one = (_prompt_logprobs(quant) - want).abs().mean()
    two = (_prompt_logprobs(quant, tensor_parallel_size=2) - want).abs().mean()
    assert two < 1.25 * one, (two, one)


# -- refusals: one sentence naming the layer ---------------------------------------------------


def test_int4_split_off_group_boundaries_refused(sharp, tmp_path):
    """Groups of 32 inputs; o_proj's 64 inputs split over 4 ranks: 16 each. (Where one group
    spans all of K, as with groups of 64 here, every rank keeps the whole scales: no refusal.)"""
    pytest.importorskip("triton")
    path = int4_checkpoint(sharp, str(tmp_path / "awq"), "awq", 32)
    with pytest.raises(ValueError, match=r"layers\.\d\.self_attn\.o_proj cannot be split over "
                       r"tensor_parallel_size=4: each rank would take 16 of its 64 inputs, "
                       r"which does not fall on the int4 groups of 32 inputs"):
        _build(path, "cuda", TensorParallel(0, 4))


def test_int4_split_inside_a_packed_word_refused(tmp_path):
    """intermediate_size 72: a rank's gate (and up) rows are 36, not whole 8-column words.
    (Per-channel scales, so down_proj's 36 inputs per rank are fine.)"""
    from transformers import AutoModelForCausalLM, LlamaConfig

    pytest.importorskip("triton")
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=72, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    dense = str(tmp_path / "dense")
    AutoModelForCausalLM.from_config(config).save_pretrained(dense)
    path = int4_checkpoint(dense, str(tmp_path / "awq"), "awq", -1)
    with pytest.raises(ValueError, match=r"mlp\.gate_up_proj cannot be split over "
                       r"tensor_parallel_size=2: each rank's 36 output rows .* 8-column words"):
        _build(path, "cuda", TensorParallel(0, 2))


def test_gguf_split_off_block_boundaries_refused(tmp_path):
    """Q8_0 blocks of 32 weights; down_proj's 96 inputs over 2 ranks: 48 each."""
    from transformers import Qwen3Config

    from tests.models.gguf_export import export_gguf
    from tests.models.variant_parity import TINY, save_tiny

    source = save_tiny(Qwen3Config(**TINY), str(tmp_path / "hf"))
    quantize = tuple(f"blk.{i}.{kind}.weight" for i in range(TINY["num_hidden_layers"])
                     for kind in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                  "ffn_up", "ffn_down"))
    path = export_gguf(source, str(tmp_path / "qwen3.gguf"), "qwen3", quantize,
                       {"attention.layer_norm_rms_epsilon": (1e-6, "add_float32")})
    with pytest.raises(ValueError, match=r"layers\.\d\.mlp\.down_proj cannot be split over "
                       r"tensor_parallel_size=2: each rank would take 48 of its 96 inputs, "
                       r"which does not fall on the GGUF Q8_0 blocks of 32 weights"):
        _build(path, "cpu", TensorParallel(0, 2), quantization="gguf")
    _build(path, "cpu", TensorParallel(0, 1), quantization="gguf")  # whole on one device


@pytest.mark.interpreted  # emulated cuda
def test_gptq_act_order_refused_before_workers_start(sharp, tmp_path):
    from tessellm import LLM

    path = int4_checkpoint(sharp, str(tmp_path / "gptq"), "gptq", 32)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"]["desc_act"] = True
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="A GPTQ act-order \\(desc_act\\) checkpoint cannot run "
                       "with tensor_parallel_size=2 yet"):
        LLM(path, device="cuda", emulate=True, num_kv_blocks=16, tensor_parallel_size=2)


@pytest.mark.interpreted  # emulated cuda
def test_load_time_refusal_reaches_the_engine_caller(sharp, tmp_path):
    """The refusal is raised while a worker loads its layers (it needs their sizes); the
    engine fails at start-up with that sentence, naming the rank."""
    from tessellm import LLM
    from tessellm.distributed.executor import WorkerDiedError

    pytest.importorskip("triton")
    path = int4_checkpoint(sharp, str(tmp_path / "awq"), "awq", 32)
    with pytest.raises(WorkerDiedError, match=r"Worker rank \d failed: ValueError: layers\.\d\."
                       r"self_attn\.o_proj cannot be split over tensor_parallel_size=4: .* "
                       r"int4 groups of 32 inputs"):
        LLM(path, device="cuda", emulate=True, num_kv_blocks=16, tensor_parallel_size=4)
