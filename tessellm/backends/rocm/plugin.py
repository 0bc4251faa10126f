"""The rocm backend plugin: AMD Instinct GPUs through a ROCm build of torch.

A ROCm build of torch reports ``torch.version.hip`` and answers the ``torch.cuda`` API (device
type "cuda"; "nccl" is RCCL there). Pieces: the cuda backend's Triton paged attention with AMD
tiles (``attention.py``), its Triton fused ops (portable Triton), HIP graphs through
``torch.cuda.CUDAGraph`` (``graph_runner.py``) and fp8 weights in ``e4m3fnuz`` on MI300
(``quant.py``). Nothing here has run on AMD hardware: see ``VALIDATION_NOTE``.
"""

from __future__ import annotations

from tessellm.backends.spec import (VALIDATED_EMULATION, AttentionSpec, Backend, GraphSpec,
                                    LogitsOpsSpec, LoRAOpsSpec, OpsSpec, QuantSpec, hookimpl)

NAME = "rocm"
VALIDATION_NOTE = ("Never run on an AMD GPU. Its Triton kernels, with these AMD tiles, pass the "
                   "conformance attention/ops tests under TRITON_INTERPRET=1 on the CPU; its "
                   "graph runner (torch.cuda.CUDAGraph) replayed its pieces correctly on an NVIDIA H200 only.")


def _is_available() -> bool:
    import torch

    return getattr(torch.version, "hip", None) is not None and torch.cuda.is_available()


def _memory_info() -> tuple[int, int]:
    import torch

    return torch.cuda.mem_get_info()


def _synchronize() -> None:
    import torch

    torch.cuda.synchronize()


@hookimpl
def tessellm_register_backends(register):
    register(Backend(
        name=NAME, device_type="cuda", dist_backend="nccl", priority=90,
        is_available=_is_available, memory_info=_memory_info, synchronize=_synchronize,
        description="AMD Instinct GPUs (ROCm): Triton paged attention with AMD tiles, HIP "
                    "graphs, fp8 e4m3fnuz weights, rccl.",
        validated_on=VALIDATED_EMULATION, validation_note=VALIDATION_NOTE,
        capabilities={"graph_capture": True,
                      "quantization": ["fp8", "fp8_block", "int8", "awq", "gptq", "gguf",
                                       "bitsandbytes"],
                      "kv_cache_dtypes": ["auto"], "sliding_window": True, "lora": True,
                      "logit_softcap": True, "attention_sinks": True, "mla": True, "mamba2": True,
                      "gated_delta": True, "key_limits": True,
                      "communicator": "rccl (torch 'nccl')",
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
    from tessellm.backends.rocm.attention import RocmTritonAttentionKernel

    return RocmTritonAttentionKernel(spec, max_model_len=spec.max_model_len or 131072,
                                     max_num_seqs=spec.max_num_seqs or 256)


@hookimpl
def tessellm_fused_ops(backend: Backend, spec: OpsSpec):
    if backend.name != NAME:
        return None
    from tessellm.kernels.fused_ops import TritonOps

    return TritonOps()


@hookimpl
def tessellm_graph_runner(backend: Backend, spec: GraphSpec):
    if backend.name != NAME or spec.enforce_eager:
        return None
    from tessellm.backends.reference.device_graph_runner import TorchDeviceGraphRunner, default_capture_sizes

    return TorchDeviceGraphRunner(spec.capture_sizes or default_capture_sizes(spec.max_num_seqs))


@hookimpl
def tessellm_quant_method(backend: Backend, spec: QuantSpec):
    """fp8: e4m3fnuz weights (MI300); int8/awq/gptq/gguf: the shared Triton dequantize-in-GEMM
    kernels, which do not depend on the fp8 format."""
    if backend.name != NAME:
        return None
    if spec.scheme == "fp8":
        from tessellm.backends.rocm.quant import RocmFp8LinearMethod

        return RocmFp8LinearMethod()
    from tessellm.kernels.gemm.quant_ops import TritonQuantOps
    from tessellm.quantization import make_quant_method

    return make_quant_method(spec, TritonQuantOps(use_scaled_mm=False, int4_tc=False))


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
