"""What to quantize and how: the user's ``quantization`` merged with the checkpoint's own.

    user asks   checkpoint                      result
    None        unquantized / .gguf             None (dense weights; a GGUF is dequantized)
    None        quantization_config (awq, ...)   that scheme, pre-quantized
    int8, fp8   unquantized or .gguf            quantized on load
    fp8_block   unquantized                     quantized on load, 128x128 blocks
    None, fp8   fp8 with weight_block_size      fp8_block, pre-quantized (Qwen3-FP8, DeepSeek-V3)
    gguf        .gguf                           GGUF blocks kept quantized in memory
    None        bitsandbytes 4-bit / 8-bit      bitsandbytes, pre-quantized (NF4/FP4, LLM.int8)
    bitsandbytes  unquantized                   NF4 on load (needs the bitsandbytes package)
    X           quantization_config of Y != X   refused: one sentence naming Y
    awq, gptq   no quantization_config          refused: they need such a checkpoint

``QuantSpec.config`` carries the normalized settings the methods read (``format``,
``group_size``, ``zero_offset``, ``prequantized``) plus the raw ``checkpoint`` dict.
"""

from __future__ import annotations

from typing import Optional

from tessellm.backends.spec import QuantSpec

SCHEMES = ("int8", "fp8", "fp8_block", "awq", "gptq", "gguf", "bitsandbytes")
_ALIASES = {"fp8_e4m3": "fp8", "fbgemm_fp8": "fp8", "w8a16": "int8", "int8_weight_only": "int8",
            "bnb": "bitsandbytes"}
_OFF = (None, "", "none", "auto")


def normalize_scheme(requested: Optional[str]) -> Optional[str]:
    if requested is None or str(requested).lower() in _OFF:
        return None
    name = str(requested).lower()
    name = _ALIASES.get(name, name)
    if name == "compressed-tensors":
        return name  # "whatever the checkpoint says"
    if name not in SCHEMES:
        raise ValueError(f"quantization={requested!r} is not a known scheme; use one of "
                         f"{', '.join(SCHEMES)} (or leave it unset).")
    return name


def checkpoint_quant_config(hf_config) -> Optional[dict]:
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    return dict(qc) if isinstance(qc, dict) else dict(qc.to_dict())


def resolve_quant_spec(requested: Optional[str], source) -> Optional[QuantSpec]:
    """The scheme to load ``source`` (a ``config.ModelSource``) with, or None for dense."""
    req = normalize_scheme(requested)
    if source.kind == "gguf":
        if req is None:
            return None
        if req in ("gguf", "int8", "fp8"):
            return QuantSpec(req, {"prequantized": req == "gguf"})
        raise ValueError(f"quantization={req!r} needs a checkpoint directory quantized that way, "
                         f"but {source.path} is a GGUF file; use 'gguf' (keep its blocks), "
                         "'int8' or 'fp8'.")
    ckpt = checkpoint_quant_config(source.hf_config)
    if ckpt is None:
        if req in (None, "compressed-tensors"):
            return None
        if req in ("int8", "fp8"):
            return QuantSpec(req, {"prequantized": False})
        if req == "fp8_block":
            return QuantSpec(req, {"prequantized": False, "weight_block_size": (128, 128)})
        if req == "bitsandbytes":
            from tessellm.quantization.bnb_method import bitsandbytes_functional

            bitsandbytes_functional()  # the package quantizes: refused now if it is missing
            return QuantSpec(req, {"prequantized": False})
        if req == "gguf":
            raise ValueError(f"quantization='gguf' needs a .gguf model file; {source.path} is a "
                             "directory (use int8 or fp8 to quantize it on load).")
        raise ValueError(f"quantization={req!r} needs a checkpoint quantized with {req.upper()} "
                         f"(a quantization_config in config.json), but {source.path} has none; "
                         "use int8 or fp8 to quantize it on load.")
    if _gpt_oss_mxfp4(source.hf_config, ckpt):
        if req not in (None, "compressed-tensors"):
            raise ValueError(f"The checkpoint at {source.path} stores its experts in MXFP4, "
                             "which tessellm dequantizes at load (no kernel runs MXFP4); leave "
                             "quantization unset.")
        return None  # dense: models/gpt_oss.py widens the MXFP4 experts as it reads them
    spec = parse_checkpoint_config(ckpt)
    if req == "fp8" and spec.scheme == "fp8_block":
        return spec  # the user asked for fp8, the checkpoint is fp8 in blocks
    if req not in (None, "compressed-tensors", spec.scheme):
        raise ValueError(f"The checkpoint at {source.path} is quantized with "
                         f"{ckpt.get('quant_method')} ({spec.scheme}); leave quantization unset "
                         f"or pass {spec.scheme!r}.")
    return spec


def _gpt_oss_mxfp4(hf_config, ckpt: dict) -> bool:
    """gpt-oss's released format: MoE experts as MXFP4 blocks, the rest dense."""
    archs = getattr(hf_config, "architectures", None) or []
    return (str(ckpt.get("quant_method", "")).lower() == "mxfp4"
            and "GptOssForCausalLM" in archs)


def parse_checkpoint_config(qc: dict) -> QuantSpec:
    """A checkpoint's ``quantization_config`` -> QuantSpec; ValueError when unsupported."""
    method = str(qc.get("quant_method", "")).lower()
    if method == "awq":
        return _awq(qc)
    if method == "gptq":
        return _gptq(qc)
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    if method == "fbgemm_fp8":  # per-channel fp8 weights, dynamic per-token activations
        return QuantSpec("fp8", {"prequantized": True, "format": "fbgemm_fp8", "checkpoint": qc})
    if method == "fp8":
        if qc.get("weight_block_size"):
            return _block_fp8(qc)
        return QuantSpec("fp8", {"prequantized": True, "format": "fp8", "checkpoint": qc,
                                 "activation_scheme": _activation_scheme(qc)})
    if method == "bitsandbytes":
        return _bitsandbytes(qc)
    if method == "mxfp4":  # gpt-oss's released checkpoints: MoE experts in MXFP4 blocks
        raise ValueError("MXFP4 checkpoints (quant_method 'mxfp4') are supported for gpt-oss "
                         "only (GptOssForCausalLM: its experts are dequantized at load); for "
                         "another model save a dequantized copy first (HF transformers: "
                         "from_pretrained(..., quantization_config=Mxfp4Config(dequantize=True)),"
                         " then save_pretrained) and load that.")
    raise ValueError(f"Checkpoint quantization {method!r} is not supported; tessellm loads awq, "
                     "gptq, fp8 (per-tensor, per-channel or block-wise), compressed-tensors FP8, "
                     "fbgemm_fp8 and bitsandbytes (4-bit, 8-bit) checkpoints.")


def _activation_scheme(qc: dict) -> str:
    scheme = str(qc.get("activation_scheme", "dynamic")).lower()
    if scheme not in ("dynamic", "static"):
        raise ValueError(f"fp8 activation_scheme {scheme!r} is not known; the checkpoint's "
                         "quantization_config should say 'dynamic' or 'static'.")
    return scheme


def _block_fp8(qc: dict) -> QuantSpec:
    """Block-wise ("fine-grained") fp8: Qwen3-*-FP8, DeepSeek-V3/R1 (``quantization/fp8_block.py``)."""
    from tessellm.quantization.fp8_block import check_block_size

    block = check_block_size(qc["weight_block_size"])
    fmt = str(qc.get("fmt", "e4m3")).lower()
    if fmt != "e4m3":
        raise ValueError(f"Block-wise fp8 checkpoints in {fmt!r} are not supported; only e4m3 "
                         "(the fmt of Qwen3-FP8 and DeepSeek-V3).")
    if _activation_scheme(qc) == "static":
        raise ValueError("This block-wise fp8 checkpoint says activation_scheme 'static', which "
                         "needs per-tensor input scales that block-wise checkpoints do not "
                         "carry; tessellm (as vLLM) quantizes block-wise activations per token "
                         "and group at run time: set \"activation_scheme\": \"dynamic\" in "
                         "config.json's quantization_config.")
    if str(qc.get("scale_fmt", "float")).lower() not in ("float", "none"):
        raise ValueError(f"Block-wise fp8 scale_fmt {qc.get('scale_fmt')!r} is not supported; "
                         "only float32 scales (weight_scale_inv).")
    return QuantSpec("fp8_block", {"prequantized": True, "format": "fp8", "checkpoint": qc,
                                   "weight_block_size": block})


def _bitsandbytes(qc: dict) -> QuantSpec:
    """bnb 4-bit (``load_in_4bit``: nf4 / fp4, double quant or not) or 8-bit (``load_in_8bit``)
    checkpoints as transformers saves them (``quantization/bnb_method.py``)."""
    four, eight = bool(qc.get("load_in_4bit")), bool(qc.get("load_in_8bit"))
    if four == eight:
        raise ValueError("This bitsandbytes checkpoint's quantization_config says load_in_4bit="
                         f"{qc.get('load_in_4bit')} and load_in_8bit={qc.get('load_in_8bit')}; "
                         "exactly one must be true (the form its weights were saved in).")
    if four:
        qtype = str(qc.get("bnb_4bit_quant_type", "fp4")).lower()
        if qtype not in ("nf4", "fp4"):
            raise ValueError(f"bnb_4bit_quant_type {qtype!r} is not supported; nf4 or fp4.")
        storage = str(qc.get("bnb_4bit_quant_storage", "uint8")).lower().removeprefix("torch.")
        if storage != "uint8":
            raise ValueError(f"bitsandbytes 4-bit codes stored as {storage} "
                             "(bnb_4bit_quant_storage) are not supported; only uint8, the "
                             "default that transformers saves.")
    elif qc.get("llm_int8_has_fp16_weight"):
        raise ValueError("This bitsandbytes 8-bit checkpoint keeps fp16 weights "
                         "(llm_int8_has_fp16_weight); load it as a dense model instead.")
    return QuantSpec("bitsandbytes", {"prequantized": True, "format": "bnb4" if four else "bnb8",
                                      "checkpoint": qc})


def _int4_common(qc: dict, name: str) -> int:
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    if bits != 4:
        raise ValueError(f"{name.upper()} checkpoints with {bits}-bit weights are not supported; "
                         "only 4-bit.")
    group = int(qc.get("group_size", qc.get("q_group_size", 128)))
    if group not in (-1, 0) and (group < 16 or group & (group - 1)):
        raise ValueError(f"{name.upper()} group size {group} is not supported; use a power of "
                         "two >= 16 or -1 (per channel).")
    return group


def _awq(qc: dict) -> QuantSpec:
    group = _int4_common(qc, "awq")
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"AWQ version {version!r} is not supported; only GEMM-packed AWQ is.")
    if not qc.get("zero_point", True):
        raise ValueError("AWQ checkpoints without zero points are not supported.")
    return QuantSpec("awq", {"prequantized": True, "format": "awq", "group_size": group,
                             "checkpoint": qc})


def _gptq(qc: dict) -> QuantSpec:
    group = _int4_common(qc, "gptq")
    fmt = str(qc.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported; use gptq or gptq_v2.")
    return QuantSpec("gptq", {"prequantized": True, "format": "gptq", "group_size": group,
                              "zero_offset": 1 if fmt == "gptq" else 0,
                              "desc_act": bool(qc.get("desc_act", False)), "checkpoint": qc})


def _compressed_tensors(qc: dict) -> QuantSpec:
    groups = list((qc.get("config_groups") or {}).values())
    if not groups:
        raise ValueError("This compressed-tensors checkpoint has no config_groups.")
    schemes = {_ct_group_kind(g) for g in groups}
    if len(schemes) != 1:
        raise ValueError("compressed-tensors checkpoints mixing several schemes are not supported.")
    weights = groups[0].get("weights") or {}
    return QuantSpec("fp8", {"prequantized": True, "format": "compressed-tensors",
                             "weight_strategy": weights.get("strategy"), "checkpoint": qc})


def _ct_group_kind(group: dict) -> str:
    w = group.get("weights") or {}
    kind = f"{w.get('type')}{w.get('num_bits')}"
    if kind == "float8" and w.get("strategy", "tensor") in ("tensor", "channel"):
        act = group.get("input_activations")
        if act is None or (act.get("type"), act.get("num_bits")) == ("float", 8):
            return "fp8"
    raise ValueError(f"compressed-tensors weights {w.get('type')} {w.get('num_bits')}-bit, "
                     f"strategy {w.get('strategy')!r}, are not supported; tessellm loads FP8 "
                     "checkpoints (per-tensor or per-channel weight scales) from compressed-tensors.")
