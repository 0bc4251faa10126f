"""Unsupported combinations are refused at start-up with one sentence naming who supports them."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from tessellm.backends.registry import BackendRegistry
from tessellm.backends.spec import QuantSpec
from tessellm.config import resolve_model
from tessellm.quantization import make_quant_method
from tessellm.quantization.config import parse_checkpoint_config, resolve_quant_spec
from tessellm.quantization.support import (UnsupportedQuantizationError, quant_method_or_refuse)
from tests.gpu_set import GPU_WHEN_PRESENT

AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}


@pytest.fixture(scope="module")
def registry():
    return BackendRegistry()


def _config_only_dir(tmp_path, tiny_model_dir, quantization_config):
    """A model directory whose config.json declares ``quantization_config`` (no weights are
    needed: refusal happens before any is read)."""
    with open(os.path.join(tiny_model_dir("llama"), "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = quantization_config
    path = tmp_path / "quantized"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize("scheme", ["awq", "gptq"])
def test_int4_refused_on_xpu_without_ipex_naming_the_others(registry, scheme):
    """The xpu backend serves int4 only through IPEX (absent from the default suite's env)."""
    xpu = registry.backends["xpu"]
    if scheme in xpu.capabilities["quantization"]:
        pytest.skip("intel_extension_for_pytorch is installed: the xpu backend serves int4")
    with pytest.raises(UnsupportedQuantizationError) as err:
        quant_method_or_refuse(registry, xpu, QuantSpec(scheme))
    msg = str(err.value)
    assert f"{scheme!r} is not supported on backend 'xpu'" in msg
    assert "cpu" in msg and "cuda" in msg and "tpu" in msg
    assert msg.count(".") == 1  # one sentence


GGUF = ["gguf"] if importlib.util.find_spec("gguf") else []  # device machines may lack it


def test_every_scheme_has_a_home(registry):
    cpu, cuda = registry.backends["cpu"], registry.backends["cuda"]
    for scheme in ["int8", "fp8", "awq", "gptq", "bitsandbytes"] + GGUF:
        assert registry.quant_method(cpu, QuantSpec(scheme)) is not None
    for scheme in ["int8", "fp8", "awq", "gptq", "bitsandbytes"] + GGUF:
        assert registry.quant_method(cuda, QuantSpec(scheme)) is not None
    assert registry.quant_method(cpu, QuantSpec("no-such-scheme")) is None


def test_awq_checkpoint_refused_at_engine_start(tmp_path, tiny_model_dir, monkeypatch):
    """A backend without AWQ refuses it before loading weights (the cpu backend's method is
    withdrawn here: every shipped backend that can start on this machine serves AWQ)."""
    from tessellm.backends.cpu import quant_ops
    from tessellm.entrypoints.llm import LLM

    monkeypatch.setattr(quant_ops.CpuQuantOps, "schemes",
                        quant_ops.TorchQuantOps.schemes - {"awq"})
    path = _config_only_dir(tmp_path, tiny_model_dir, AWQ)
    with pytest.raises(UnsupportedQuantizationError, match="backends that support it: cuda"):
        LLM(path, device="cpu")


def test_fp8_kv_cache_refused_on_cpu_naming_cuda(tiny_model_dir):
    from tessellm.entrypoints.llm import LLM

    with pytest.raises(UnsupportedQuantizationError,
                       match=r"kv_cache_dtype='fp8' is not supported by the 'cpu'.*cuda"):
        LLM(tiny_model_dir("llama"), device="cpu", kv_cache_dtype="fp8", max_model_len=128)


def test_unknown_kv_cache_dtype(tiny_model_dir):
    from tessellm.entrypoints.llm import LLM

    with pytest.raises(UnsupportedQuantizationError, match="kv_cache_dtype='int3' is not known"):
        LLM(tiny_model_dir("llama"), device="cpu", kv_cache_dtype="int3", max_model_len=128)


def test_scheme_and_source_mismatches(tmp_path, tiny_model_dir):
    dense = resolve_model(tiny_model_dir("llama"))
    with pytest.raises(ValueError, match="not a known scheme; use one of int8, fp8"):
        resolve_quant_spec("int3", dense)
    with pytest.raises(ValueError, match="needs a .gguf model file"):
        resolve_quant_spec("gguf", dense)
    with pytest.raises(ValueError, match="needs a checkpoint quantized with AWQ"):
        resolve_quant_spec("awq", dense)
    assert resolve_quant_spec(None, dense) is None
    assert resolve_quant_spec("int8", dense).scheme == "int8"
    awq = resolve_model(_config_only_dir(tmp_path, tiny_model_dir, AWQ))
    with pytest.raises(ValueError, match="quantized with awq"):
        resolve_quant_spec("gptq", awq)
    assert resolve_quant_spec(None, awq).scheme == "awq"


def test_gguf_source_schemes(bundled_model):
    gguf_source = resolve_model(bundled_model)
    with pytest.raises(ValueError, match="is a GGUF file"):
        resolve_quant_spec("awq", gguf_source)
    assert resolve_quant_spec(None, gguf_source) is None  # default: dequantize, as before
    assert resolve_quant_spec("gguf", gguf_source).scheme == "gguf"


@pytest.mark.parametrize("config, match", [
    ({"quant_method": "fp8", "weight_block_size": [128, 100]}, r"\[128, 100\] is not supported"),
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "8-bit weights are not supported"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "only GEMM"),
    ({"quant_method": "hqq"}, "'hqq' is not supported"),
    ({"quant_method": "bitsandbytes"}, "exactly one must be true"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {
        "weights": {"num_bits": 4, "type": "int", "strategy": "group"}}}}, "int 4-bit"),
])
def test_unsupported_checkpoint_configs(config, match):
    with pytest.raises(ValueError, match=match):
        parse_checkpoint_config(config)


def test_checkpoint_configs_parse():
    ct = {"quant_method": "compressed-tensors", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                              "dynamic": True}}}}
    assert parse_checkpoint_config(ct).scheme == "fp8"
    assert parse_checkpoint_config({"quant_method": "fbgemm_fp8"}).scheme == "fp8"
    block = parse_checkpoint_config({"quant_method": "fp8", "weight_block_size": [128, 128]})
    assert block.scheme == "fp8_block" and block.config["weight_block_size"] == (128, 128)
    gptq = parse_checkpoint_config({"quant_method": "gptq", "bits": 4, "group_size": 128,
                                    "desc_act": True, "checkpoint_format": "gptq"})
    assert gptq.scheme == "gptq" and gptq.config["zero_offset"] == 1
    assert gptq.config["desc_act"] is True


@pytest.mark.parametrize("backend", ["cpu", pytest.param("cuda", marks=GPU_WHEN_PRESENT)])
def test_conformance_style_quantize_dense_on_bare_module(backend):
    """A method works on a bare module through ``quantize_dense`` (the conformance suite's way)."""
    if backend == "cuda":
        pytest.importorskip("triton")
        from tessellm.kernels.gemm.quant_ops import TritonQuantOps as Ops
    else:
        from tessellm.backends.cpu.quant_ops import CpuQuantOps as Ops
    dev = torch.device("cuda" if backend == "cuda" and torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    w, x, b = torch.randn(48, 64, generator=g), torch.randn(5, 64, generator=g), torch.randn(48)
    w, x, b = w.to(dev), x.to(dev), b.to(dev)
    schemes = [("int8", 0.02), ("fp8", 0.08), ("awq", 0.2), ("gptq", 0.2)]
    schemes += [(g, 0.02) for g in GGUF]
    for scheme, tol in schemes:
        method = make_quant_method(QuantSpec(scheme, dtype=torch.float32), Ops())
        layer = torch.nn.Module()
        with torch.device(dev):
            method.create_weights(layer, 64, 48, torch.float32)
        method.quantize_dense(layer, w)
        method.process_weights_after_loading(layer)
        want = x @ w.t() + b
        rel = ((method.apply(layer, x, b) - want).norm() / want.norm()).item()
        assert rel < tol, (scheme, rel)
