"""The cuda backend plugin: Triton paged attention and fused ops, CUDA graphs, nccl."""

from __future__ import annotations

from tessellm.backends.spec import (AttentionSpec, Backend, GraphSpec, LogitsOpsSpec, LoRAOpsSpec,
                                    OpsSpec, hookimpl)

NAME = "cuda"


def _is_available() -> bool:
    import torch

    # A ROCm build of torch also answers torch.cuda; that is the rocm backend's hardware.
    return torch.cuda.is_available() and getattr(torch.version, "hip", None) is None


def _memory_info() -> tuple[int, int]:
    import torch

    return torch.cuda.mem_get_info()


def _synchronize() -> None:
    import torch

    torch.cuda.synchronize()


def _overlap_streams():
    from tessellm.backends.cuda.streams import overlap_streams

    return overlap_streams()


@hookimpl
def tessellm_register_backends(register):
    register(Backend(
        name=NAME, device_type="cuda", dist_backend="nccl", priority=100,
        is_available=_is_available, memory_info=_memory_info, synchronize=_synchronize,
        overlap_streams=_overlap_streams,
        description="NVIDIA GPUs: Triton paged attention and fused ops, CUDA graphs.",
        validated_on="hardware",
        validation_note=("Conformance, kernel and parity tests on an NVIDIA H200 (2026-11-21); "
                         "tensor and pipeline parallelism (NCCL, symmetric-memory all-reduce) on "
                         "2 and 4 H200s of one host."),
        capabilities={"graph_capture": True,
                      "quantization": ["int8", "fp8", "fp8_block", "awq", "gptq", "gguf",
                                       "bitsandbytes"],
                      "kv_cache_dtypes": ["auto", "fp8"], "lora": True, "logit_softcap": True,
                      "attention_sinks": True, "mla": True, "mamba2": True, "gated_delta": True,
                      "decode_overlap": True,
                      "key_limits": True,
                      # --emulate: the Triton kernels in Triton's interpreter on host tensors
                      "emulation_env": {"TRITON_INTERPRET": "1"}},
    ))


@hookimpl
def tessellm_attention_kernel(backend: Backend, spec: AttentionSpec):
    if backend.name != NAME:
        return None
    if getattr(spec, "mla_value_size", None) is not None:  # DeepSeek's latent cache
        from tessellm.kernels.attention.mla import TritonMLAAttentionKernel

        return TritonMLAAttentionKernel(spec)
    from tessellm.kernels.attention import TritonAttentionKernel

    # The engine's limits size the decode workspace; without them (a kernel built outside an
    # engine) the widest the engine serves by default.
    return TritonAttentionKernel(spec, max_model_len=spec.max_model_len or 131072,
                                 max_num_seqs=spec.max_num_seqs or 1024)


@hookimpl
def tessellm_fused_ops(backend: Backend, spec: OpsSpec):
    if backend.name != NAME:
        return None
    from tessellm.backends.cuda.ops import CudaOps

    return CudaOps()


@hookimpl
def tessellm_graph_runner(backend: Backend, spec: GraphSpec):
    if backend.name != NAME or spec.enforce_eager:
        return None
    from tessellm.backends.cuda.graph_runner import CudaGraphRunner, default_capture_sizes

    return CudaGraphRunner(spec.capture_sizes or default_capture_sizes(spec.max_num_seqs))


@hookimpl
def tessellm_quant_method(backend: Backend, spec):
    """int8, fp8 (torch._scaled_mm on sm89+, else Triton), awq, gptq and gguf via Triton."""
    if backend.name != NAME:
        return None
    from tessellm.kernels.gemm.quant_ops import TritonQuantOps
    from tessellm.quantization import make_quant_method

    return make_quant_method(spec, TritonQuantOps())


@hookimpl
def tessellm_logits_ops(backend: Backend, spec: LogitsOpsSpec):
    if backend.name != NAME:
        return None
    from tessellm.kernels.bitmask import TritonLogitsOps

    return TritonLogitsOps()


@hookimpl
def tessellm_lora_ops(backend: Backend, spec: LoRAOpsSpec):
    """Batched multi-LoRA shrink/expand: the portable Triton kernels (kernels/lora/)."""
    if backend.name != NAME:
        return None
    from tessellm.kernels.lora import TritonLoRAOps

    return TritonLoRAOps()
