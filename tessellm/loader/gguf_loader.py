"""GGUF checkpoints: a Hugging Face config, tokenizer and dequantized weights from one `.gguf` file.

A GGUF file is a header followed by aligned tensor data (all little-endian):

    "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv      x (key: str, value type: u32, value)           <- metadata: hyper-parameters, tokenizer
    n_tensors x (name: str, n_dims: u32, dims: u64[n_dims], ggml type: u32, offset: u64)
    padding up to `general.alignment` (32 by default)
    tensor data: tensor i starts at data_start + offset_i     (str = length u64 + utf-8 bytes)

Invariants:
- The header is parsed here, not with `gguf.GGUFReader`: that one decodes all 49k vocabulary strings
  and 49k merges up front (~2.5 s); we skip string arrays and only keep their length (~10 ms).
  The tokenizer, which does need them, is built by transformers' own GGUF tokenizer conversion.
- Shapes are in torch order. GGUF lists dims fastest-moving first, so a GGUF [576, 1536] ffn_gate
  tensor is the (1536, 576) `gate_proj.weight`.
- Dequantization is `gguf.quants.dequantize` to float32, then a cast to the requested dtype: in
  float32 the result is bit-identical to what transformers loads from the same file.
- Weights stream one tensor at a time from a read-only memory map; nothing holds the whole model.
- With `quantization="gguf"` the linear layers' tensors are not dequantized: they are yielded as
  `GGUFQuantized` (raw blocks) and kept quantized in memory by `tessellm.quantization.gguf`.
"""

import functools
import os
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

import gguf
import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedTokenizerFast

from tessellm.loader.gguf_families import (FAMILY_GLOBAL_NAMES, FAMILY_LAYER_NAMES, FUSED_ROWS,
                                           GEMMA_NORM_PLUS_ONE, NORM_EPSILON, falcon_config,
                                           family_fields, file_layer_names)

from tessellm.loader.gguf_gemma3 import GEMMA3_LAYER_NAMES, gemma3_config, gemma3_tokenizer_fixups
from tessellm.loader.gguf_moe import (MOE_ARCHS, MOE_LAYER_NAMES, expert_kind, moe_fields,
                                      split_experts)
from tessellm.loader.gguf_rope import gguf_rope_scaling
from tessellm.loader.transformers_classes import transformers_class

ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's per-frequency RoPE divisors (gguf_rope.py)

# GGUF `general.architecture` -> (HF architecture name, transformers config class name, llama.cpp
# permuted q/k rows). Names, resolved when a file of that architecture loads: a transformers
# release without one family's config (ExaoneConfig arrived in 5.24: transformers_classes.py) still
# loads the others.
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", True),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", False),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", False),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", False),  # gguf_families.py
    "starcoder2": ("Starcoder2ForCausalLM", "Starcoder2Config", False),
    "phi2": ("PhiForCausalLM", "PhiConfig", False),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", False),
    "gptneox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", False),
    "falcon": ("FalconForCausalLM", None, False),  # gguf_families.falcon_config
    "gemma": ("GemmaForCausalLM", "GemmaConfig", False),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", False),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", False),
    "command-r": ("CohereForCausalLM", "CohereConfig", False),
    "exaone": ("ExaoneForCausalLM", "ExaoneConfig", False),
    "glm4": ("Glm4ForCausalLM", "Glm4Config", False),
    "qwen2moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", False),  # gguf_moe.py
    "qwen3moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", False),
}

# GGUF tensor name (without `.weight`/`.bias`) -> HF module name
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {  # blk.{i}.KEY -> model.layers.{i}.VALUE
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

_ARCH_LAYER_NAMES = {"gemma3": {**_LAYER_NAMES, **GEMMA3_LAYER_NAMES},
                     **{arch: {**_LAYER_NAMES, **names}
                        for arch, names in {**FAMILY_LAYER_NAMES, **MOE_LAYER_NAMES}.items()}}

_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class _TensorInfo:
    name: str  # GGUF name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]  # torch order (GGUF's dims reversed)
    qtype: gguf.GGMLQuantizationType  # storage type: F32, F16, Q4_1, Q8_0, ...
    start: int  # absolute byte offset of the tensor's data in the file


@dataclass(frozen=True)
class _Header:
    path: str
    metadata: dict[str, Any]  # string arrays (vocabulary, merges) are kept as their length only
    tensors: list[_TensorInfo]  # in file order
    blob: np.ndarray  # the whole file, a read-only uint8 memory map


class _Cursor:
    """Reads little-endian GGUF values from a byte buffer, advancing `pos`."""

    def __init__(self, buf: np.ndarray):
        self.buf, self.pos = buf, 0

    def scalars(self, code: str, count: int = 1) -> tuple:
        """`count` values of struct type `code` (e.g. "Q")."""
        values = struct.unpack_from(f"<{count}{code}", self.buf, self.pos)
        self.pos += struct.calcsize(f"<{count}{code}")
        return values

    def string(self) -> str:
        """One length-prefixed utf-8 string."""
        (length,) = self.scalars("Q")
        self.pos += length
        return bytes(self.buf[self.pos - length : self.pos]).decode("utf-8", errors="replace")

    def value(self, value_type: int) -> Any:
        """One metadata value; an array of strings is skipped and returned as its length."""
        if value_type in _SCALAR_FORMATS:
            return self.scalars(_SCALAR_FORMATS[value_type])[0]
        if value_type == _STRING:
            return self.string()
        if value_type != _ARRAY:
            raise ValueError(f"unknown GGUF metadata value type {value_type}")
        element_type, count = self.scalars("I")[0], self.scalars("Q")[0]
        if element_type in _SCALAR_FORMATS:
            return list(self.scalars(_SCALAR_FORMATS[element_type], count))
        for _ in range(count):  # strings: walk past them without decoding
            self.pos += 8 + self.scalars("Q")[0]
        return count


def _read_header(path: str | os.PathLike) -> _Header:
    """Parse a GGUF file's metadata and tensor table (no tensor data is read)."""
    path = os.fspath(path)
    cursor = _Cursor(np.memmap(path, dtype=np.uint8, mode="r"))
    magic = bytes(cursor.buf[:4])
    cursor.pos = 4
    version = cursor.scalars("I")[0]
    if magic != b"GGUF" or version not in (2, 3):
        raise ValueError(f"{path} is not a GGUF v2/v3 file (magic {magic!r}, version {version}).")
    n_tensors, n_kv = cursor.scalars("Q", 2)
    metadata = {}
    for _ in range(n_kv):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.scalars("I")[0])
    table = []
    for _ in range(n_tensors):
        name, n_dims = cursor.string(), cursor.scalars("I")[0]
        dims = cursor.scalars("Q", n_dims)
        qtype, offset = cursor.scalars("I")[0], cursor.scalars("Q")[0]
        table.append((name, tuple(reversed(dims)), gguf.GGMLQuantizationType(qtype), offset))
    align = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    data_start = -(-cursor.pos // align) * align
    tensors = [_TensorInfo(name, shape, qtype, data_start + off) for name, shape, qtype, off in table]
    return _Header(path, metadata, tensors, cursor.buf)


def _architecture(header: _Header) -> str:
    """The file's `general.architecture`; a clear ValueError if we can't load the file."""
    arch = header.metadata.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} in {header.path} is not supported; tessellm loads GGUF files "
            f"of architecture {', '.join(map(repr, _ARCHITECTURES))} (use a safetensors checkpoint otherwise)."
        )
    if header.metadata.get(f"{arch}.expert_count", 0) and arch not in MOE_ARCHS:
        raise ValueError(f"{header.path} is a mixture-of-experts {arch!r} GGUF (e.g. Mixtral); "
                         f"tessellm loads MoE GGUF files of architecture "
                         f"{', '.join(map(repr, MOE_ARCHS))} only; load a safetensors copy.")
    return arch


def _config_class(arch: str, name: Optional[str]):
    """transformers' config class ``name`` for a GGUF file of ``arch``; one clear error where this
    transformers release lacks it (``transformers_classes.transformers_class``)."""
    return None if name is None else transformers_class(name, f"GGUF {arch!r}")


def _hparam(header: _Header, arch: str, key: str, default: Any = ...) -> Any:
    """Metadata `{arch}.{key}`; ValueError if it is missing and there is no default."""
    value = header.metadata.get(f"{arch}.{key}", default)
    if value is ...:
        raise ValueError(f"{header.path} lacks the GGUF metadata key '{arch}.{key}'.")
    return value


def _common_fields(hp, token_id: dict, embed_rows, tensor_names,
                   norm_epsilon=("attention.layer_norm_rms_epsilon", "rms_norm_eps")) -> dict:
    """The HF config fields every supported GGUF architecture reads alike from its header;
    ``norm_epsilon``: (metadata key, HF field) of the norms' epsilon."""
    heads = hp("attention.head_count")
    return dict(
        **{norm_epsilon[1]: hp(norm_epsilon[0])},
        vocab_size=hp("vocab_size", embed_rows),
        hidden_size=hp("embedding_length"),
        intermediate_size=hp("feed_forward_length"),
        num_hidden_layers=hp("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=hp("attention.head_count_kv", heads),
        max_position_embeddings=hp("context_length"),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=token_id["bos"],
        pad_token_id=token_id["padding"],
    )


def _stop_ids(metadata: dict, eos):
    """eos, or [eos, eot] when the file names an end-of-turn token apart from it (Gemma's
    ``<end_of_turn>``, Llama 3's ``<|eot_id|>``): llama.cpp ends generation at either."""
    eot = metadata.get("tokenizer.ggml.eot_token_id")
    return [eos, eot] if eos is not None and eot is not None and eot != eos else eos


def load_gguf_config(path: str | os.PathLike) -> PretrainedConfig:
    """HF config (LlamaConfig / Qwen2Config / Gemma3TextConfig / ...: ``_ARCHITECTURES``) built
    from a GGUF file's metadata."""
    header = _read_header(path)
    arch = _architecture(header)
    hf_arch, config_name, _ = _ARCHITECTURES[arch]
    config_class = _config_class(arch, config_name)
    hp = functools.partial(_hparam, header, arch)
    tensor_names, extra = {t.name for t in header.tensors}, {}
    embed_rows = next((t.shape[0] for t in header.tensors if t.name == "token_embd.weight"), None)
    token_id = {k: header.metadata.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    eps = NORM_EPSILON.get(arch)
    common = _common_fields(hp, token_id, embed_rows, tensor_names, *([eps] if eps else []))
    if arch == "falcon":
        return falcon_config(hp, common, tensor_names, token_id["eos"])
    extra.update(family_fields(arch, hp, common, tensor_names))
    if arch in MOE_ARCHS:
        extra.update(moe_fields(arch, hp, tensor_names))
    if arch == "llama":  # Qwen2 always has q/k/v biases; a llama-arch file may have them or not
        extra["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    freqs = next((_dequantize(header, t) for t in header.tensors if t.name == ROPE_FREQS), None)
    if arch == "gemma3":
        scaling = gguf_rope_scaling(header.metadata, arch, freqs, 0, 0.0, header.path)
        return gemma3_config(hp, common, token_id["eos"], embed_rows, scaling)
    hidden, heads = common["hidden_size"], common["num_attention_heads"]
    head_dim = extra.pop("head_dim", None) or hp("attention.key_length",
                                                   hp("rope.dimension_count", hidden // heads))
    theta = hp("rope.freq_base", 10000.0)
    scaling = gguf_rope_scaling(header.metadata, arch, freqs, head_dim, theta, header.path)
    if scaling is not None:
        extra["rope_scaling"] = scaling
    return config_class(
        architectures=[hf_arch],
        **common,
        head_dim=head_dim,
        rope_theta=theta,
        eos_token_id=_stop_ids(header.metadata, token_id["eos"]),
        **extra,
    )


def load_gguf_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """HF fast tokenizer (vocab, merges, special tokens, chat template) from a GGUF, via transformers."""
    path = os.path.abspath(os.fspath(path))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), local_files_only=True
    )
    metadata = _read_header(path).metadata
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    if isinstance(eos, int) and tokenizer.eos_token_id != eos and eos < len(tokenizer):
        # transformers before 4.56 (4.48 and 4.51 measured) makes the bundled SmolLM2's EOS
        # <|im_start|> (id 1); the file says <|im_end|> (2), as llama.cpp and the engine use it.
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    if metadata.get("general.architecture") == "gemma3":
        gemma3_tokenizer_fixups(tokenizer)
    return tokenizer


def _hf_name(gguf_name: str, arch: str = "llama", file_names: dict | None = None) -> str:
    """HF name of a GGUF tensor name: `blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`
    (``file_names``: this file's overrides, ``gguf_families.file_layer_names``)."""
    layer_names = {**_ARCH_LAYER_NAMES.get(arch, _LAYER_NAMES), **(file_names or {})}
    global_names = {**_GLOBAL_NAMES, **FAMILY_GLOBAL_NAMES.get(arch, {})}
    stem, suffix = gguf_name.rsplit(".", 1)
    if stem in global_names:
        return f"{global_names[stem]}.{suffix}"
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if match and match[2] in layer_names:
        return f"model.layers.{match[1]}.{layer_names[match[2]]}.{suffix}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no tessellm equivalent; this GGUF variant is unsupported.")


def _dequantize(header: _Header, info: _TensorInfo) -> torch.Tensor:
    """One tensor as a fresh float32 torch tensor of shape `info.shape`."""
    byte_shape = gguf.quants.quant_shape_to_byte_shape(info.shape, info.qtype)
    raw = header.blob[info.start : info.start + int(np.prod(byte_shape))].reshape(byte_shape)
    values = gguf.quants.dequantize(raw, info.qtype)  # F32 comes back as a view of the read-only map
    return torch.from_numpy(values if values.flags.writeable else values.copy())


def _unpermute_rotary(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation, per head (d = head_dim):

        GGUF rows  x0 y0 x1 y1 ... x(d/2-1) y(d/2-1)    (rotary pairs interleaved)
        HF rows    x0 x1 ... x(d/2-1) y0 y1 ... y(d/2-1) (pairs d/2 apart: `rotate_half`)
    """
    shape = weight.shape
    return weight.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)


@dataclass(frozen=True)
class GGUFQuantized:
    """One GGUF tensor still in its llama.cpp blocks (see `iter_gguf_weights(keep_quantized=...)`).

    Rows are independent runs of blocks along the input dim, so q/k un-permutation is a
    permutation of `data`'s rows, done before this is yielded."""

    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, int]  # torch order: (rows, input size)
    data: torch.Tensor  # uint8 [rows, bytes per row], a private copy (not the memory map)

    def dequantize(self) -> torch.Tensor:
        """float32 `shape`, exactly as the dequantizing path gives it."""
        values = gguf.quants.dequantize(self.data.numpy(), self.qtype)
        return torch.from_numpy(np.ascontiguousarray(values)).reshape(self.shape)

    def split_rows(self, sizes: list[int]) -> list["GGUFQuantized"]:
        """Consecutive runs of `sizes` rows (a fused tensor's parts, e.g. Phi-3's q, k, v), each
        still in its blocks."""
        return [GGUFQuantized(self.qtype, (rows, self.shape[1]), part)
                for rows, part in zip(sizes, self.data.split(sizes, dim=0))]


_DENSE_TYPES = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16)


def _raw_rows(header: _Header, info: _TensorInfo) -> torch.Tensor:
    """One 2-D quantized tensor's bytes as uint8 [rows, bytes per row] (copied out of the map)."""
    byte_shape = gguf.quants.quant_shape_to_byte_shape(info.shape, info.qtype)
    raw = header.blob[info.start : info.start + int(np.prod(byte_shape))].reshape(byte_shape)
    return torch.from_numpy(np.array(raw))


def read_quantized(path: str | os.PathLike, gguf_name: str) -> GGUFQuantized | None:
    """The raw blocks of one quantized 2-D tensor (e.g. ``token_embd.weight``), or None when the
    file lacks it or stores it dense."""
    header = _read_header(path)
    info = next((t for t in header.tensors if t.name == gguf_name), None)
    if info is None or info.qtype in _DENSE_TYPES or len(info.shape) != 2:
        return None
    return GGUFQuantized(info.qtype, info.shape, _raw_rows(header, info))


def iter_gguf_weights(
    path: str | os.PathLike, dtype: torch.dtype, keep_quantized: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, Any]]:
    """Yield `(hf_name, tensor)` per GGUF tensor in file order, dequantized to `dtype` one at a time.

    `keep_quantized(hf_name)` True: a quantized 2-D tensor is yielded as `GGUFQuantized` (its raw
    blocks) instead, for a quantized linear layer to keep in memory as it is."""
    header = _read_header(path)
    arch = _architecture(header)  # raises now, not at the first next()
    heads = _hparam(header, arch, "attention.head_count")
    rotary_heads = {"attn_q": heads, "attn_k": _hparam(header, arch, "attention.head_count_kv", heads)}
    permuted = _ARCHITECTURES[arch][2]
    file_names = file_layer_names(arch, {t.name for t in header.tensors})
    part_heads = {**rotary_heads, "attn_v": rotary_heads["attn_k"]}  # FUSED_ROWS parts' heads

    def stream() -> Iterator[tuple[str, Any]]:
        for info in header.tensors:
            if info.name == ROPE_FREQS:
                continue  # read into the config's rope_scaling (load_gguf_config)
            kind = info.name.split(".")[-2]
            if (stacked := expert_kind(info.name)) is not None:  # gguf_moe.py
                yield from split_experts(*stacked, _dequantize(header, info), dtype)
                continue
            parts = FUSED_ROWS.get(arch, {}).get(kind)  # e.g. gptneox's attn_qkv: q, k, v rows
            names = [_hf_name(info.name.replace(f".{kind}.", f".{p}."), arch, file_names)
                     for p in parts or (kind,)]
            raw = (keep_quantized is not None and info.qtype not in _DENSE_TYPES
                   and len(info.shape) == 2 and keep_quantized(names[0]))
            weight = _raw_rows(header, info) if raw else _dequantize(header, info)
            if permuted and kind in rotary_heads:
                weight = _unpermute_rotary(weight, rotary_heads[kind])
            if arch in GEMMA_NORM_PLUS_ONE and names[0].endswith("norm.weight"):
                weight = weight - 1  # llama.cpp stores Gemma's 1 + w; HF names hold w (as HF does)
            if kind == "ffn_gate_inp_shexp" and weight.dim() == 1:
                weight = weight[None]  # llama.cpp's [hidden] vector; HF's [1, hidden]
            tensor = GGUFQuantized(info.qtype, info.shape, weight) if raw else weight.to(dtype)
            if parts is None:
                yield names[0], tensor
                continue
            # q, k, v rows in proportion heads : kv : kv (equal parts where every head has its own)
            per_head = info.shape[0] // sum(part_heads[p] for p in parts)
            rows = [part_heads[p] * per_head for p in parts]
            yield from zip(names, tensor.split_rows(rows) if raw else tensor.split(rows))

    return stream()
