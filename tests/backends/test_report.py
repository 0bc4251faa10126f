"""``tessellm backends [--verbose]`` text: every backend, its plugin, availability, priority,
validation and capabilities; verbose adds which plugin provides each piece."""

from __future__ import annotations

import torch

from backend_plugins import auto_device, make_plugin
from tessellm.backends.registry import BackendRegistry
from tessellm.backends.report import describe_backends


def test_lists_every_backend_with_plugin_availability_and_validation():
    text = describe_backends(verbose=False, registry=BackendRegistry())
    rows = {line.split()[0]: line.split() for line in text.splitlines()
            if line.split() and line.split()[0] in {"cpu", "cuda", "rocm", "xpu", "tpu"}}
    assert rows["cpu"][1:4] == ["cpu", "yes", "0"]
    assert rows["rocm"][1:4] == ["rocm", "yes" if auto_device() == "rocm" else "no", "90"]
    assert rows["rocm"][-1] == "emulation"
    assert rows["tpu"][-1] == "untested" and rows["xpu"][-1] == "untested"
    assert f"--device=auto selects: {auto_device()}" in text  # cpu without a GPU
    assert "Never run on an AMD GPU" in text  # the honest validation note
    assert "quantization=[fp8,fp8_block,int8,awq,gptq,gguf,bitsandbytes]" in text  # rocm
    assert "  pieces (for" not in text


def test_verbose_shows_which_plugin_provides_each_piece():
    override = make_plugin("fastattn", """
        TESSELLM_OVERRIDES = ("cpu",)
        from tessellm.backends.cpu.attention import CpuAttentionKernel
        class Fast(CpuAttentionKernel):
            name = "fast-cpu"
        @hookimpl(tryfirst=True)
        def tessellm_attention_kernel(backend, spec):
            return Fast(spec) if backend.name == "cpu" else None
    """)
    text = describe_backends(verbose=True, registry=BackendRegistry(plugins=[("fastattn", override)]))
    cpu = text[text.index("\ncpu: "):]
    assert "attention: fast-cpu (Fast) from plugin 'fastattn'" in cpu
    assert "  overridden by: fastattn (TESSELLM_OVERRIDES)" in cpu
    assert "ops:       CpuOps (CpuOps) from plugin 'cpu' [linear, fused MoE, block-fp8 experts, expert map, int4 experts, int4 act order, bnb4 experts, fused experts, recurrent verify, verify graphs]" in cpu
    assert "graph:     none (eager)" in cpu
    rocm = text[text.index("\nrocm: "):text.index("\ntpu: ")]
    assert "attention: triton-rocm (RocmTritonAttentionKernel) from plugin 'rocm'" in rocm
    cuda = text[text.index("\ncuda: "):text.index("\nrocm: ")]
    # optional contract flags the pieces declare (cuda: rotary fused into the cache write,
    # FusedOps.linear for 1-2 row products, the all-reduce fused with the norm after it)
    assert "(TritonAttentionKernel) from plugin 'cuda' [graph capture, sliding window, " \
           "fuses rotary, logit soft-cap, attention sinks, key limits]" in cuda
    assert "(CudaOps) from plugin 'cuda' [linear, linear + SiLU, all-reduce + norm, fused MoE, block-fp8 experts, expert map, int4 experts, int4 act order, bnb4 experts, fused experts, fp8 act fold, gated RMSNorm, recurrent verify, verify graphs]" in cuda
    assert "graph:     hip-graphs" in rocm and "fp8 -> fp8 (RocmFp8LinearMethod)" in rocm
    assert "lora:      triton (TritonLoRAOps) from plugin 'cuda' [graph capture]" in cuda
    assert "lora:      reference LoRA ops (no plugin answered)" in cpu
    assert "attention (tessellm_attention_kernel): fastattn, " in text


def test_a_piece_that_errors_is_shown_not_raised():
    bad = make_plugin("bad", """
        @hookimpl(tryfirst=True)
        def tessellm_graph_runner(backend, spec):
            raise RuntimeError("driver exploded")
    """)
    text = describe_backends(verbose=True, registry=BackendRegistry(plugins=[("bad", bad)]))
    assert "graph:     error: PluginError: Backend plugin 'bad' raised" in text
    assert torch.is_tensor(torch.zeros(1))  # the report never touched a device
