"""TII Falcon-H1 (``FalconH1ForCausalLM``: Falcon-H1 0.5B ... 34B): every layer runs attention and
a Mamba2 mixer side by side on the same normed input, then an MLP::

    layer i:  x = input_layernorm(h, res)
              h = mamba(x) * ssm_out + attention(x * attention_in) * attention_out
              -> pre_ff_layernorm(h, res) -> mlp (SwiGLU: gate scaled before the activation,
                 down scaled after) -> the next layer's input_layernorm

with the model's muP multipliers: the embeddings times ``embedding_multiplier``, the logits
times ``lm_head_multiplier``, k times ``key_multiplier``, and the mixer's projected
``[z | x | B | C | dt]`` sections times ``ssm_multipliers`` (its input times
``ssm_in_multiplier``). Every multiplier inside a layer scales a linear map's input or output,
so it is folded into that projection's weight (and bias, where it scales the output) as the
checkpoint loads: no step pays for it. A quantized checkpoint (fp8 per tensor, channel or
128x128 block; AWQ / GPTQ int4) keeps its codes and takes the fold in its scales
(``fold_multiplier``); ``quantization="fp8"`` / ``"int8"`` quantize the folded dense weights.

The Mamba mixer's gated norm follows ``mamba_rms_norm`` / ``mamba_norm_before_gate``
(``layers/mamba_mixer.py``: none, before or after the gate); ``mamba_d_ssm`` sets its width.
Under tensor parallelism the attention's and the mixer's partial sums are added, then summed
over the ranks once, by ``pre_ff_layernorm`` (unless a bias makes them sum themselves).

Checkpoint names: llama's with Bamba's renames (``feed_forward``, ``pre_ff_layernorm``,
``final_layernorm``) plus ``layers.{i}.mamba.*``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import torch
import torch.nn as nn

from tessellm.layers.context import ModelContext
from tessellm.layers.linear import materialize
from tessellm.layers.mamba_mixer import MambaMixer2
from tessellm.layers.norm import add_and_norm
from tessellm.models.bamba import bamba_names
from tessellm.models.decoder import DecoderAttention
from tessellm.models.llama import LlamaForCausalLM
from tessellm.models.mamba_decoder_layer import hybrid_mamba_shape, load_mamba_tensors
from tessellm.quantization.stored_parts import checkpoint_block_rows


class FalconH1DecoderLayer(nn.Module):
    def __init__(self, attention: DecoderAttention, mamba: MambaMixer2, mlp: nn.Module,
                 norm: Callable[..., nn.Module], input_reduce, mixed_reduce):
        """``norm(reduce)`` builds each norm; ``input_reduce`` / ``mixed_reduce``: the tensor
        group the input norm / pre_ff_layernorm sums its input over (None: it is whole)."""
        super().__init__()
        self.self_attn = attention
        self.mamba = mamba
        self.mlp = mlp
        self.input_layernorm = norm(input_reduce)
        self.post_attention_layernorm = norm(mixed_reduce)  # the checkpoint's pre_ff_layernorm

    def forward(self, positions, hidden, residual, metadata):
        hidden, residual = add_and_norm(self.input_layernorm, hidden, residual)
        mixed = self.mamba(hidden) + self.self_attn(positions, hidden, metadata)
        hidden, residual = self.post_attention_layernorm(mixed, residual)
        return self.mlp(hidden), residual


class FalconH1ForCausalLM(LlamaForCausalLM):
    def __init__(self, config, ctx: ModelContext):
        super().__init__(config, ctx)
        self.embedding_multiplier = float(config.embedding_multiplier)
        self.lm_head_multiplier = float(config.lm_head_multiplier)
        self._folds = _multiplier_folds(config)
        self._block_rows = checkpoint_block_rows(config)  # block-wise fp8 checkpoints, else None

    def check_config(self, config) -> None:
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"Falcon-H1 hidden_act {act!r} is not supported; only silu is.")

    def mixers_summed(self, config) -> bool:
        """Whether the attention and the mixer sum their outputs themselves (a bias on either
        output projection makes that one do it, so both must)."""
        return bool(config.attention_bias) or bool(config.projectors_bias)

    def make_layer(self, config, ctx: ModelContext, rotary, index: int) -> nn.Module:
        summed = self.mixers_summed(config)
        bias = bool(config.attention_bias)
        attention = DecoderAttention(config, ctx, rotary, bias, False, o_bias=bias,
                                     reduce_output=summed)
        mamba = MambaMixer2(falcon_mamba_shape(config), ctx, reduce_output=summed)
        input_summed = index == 0 or self.output_summed(config)
        return FalconH1DecoderLayer(attention, mamba, self.make_mlp(config, ctx, index),
                                    lambda reduce: self.make_norm(config, ctx, reduce),
                                    None if input_summed else ctx.tp, None if summed else ctx.tp)

    def mamba_layers(self) -> list[MambaMixer2]:
        """This pipeline stage's mixers."""
        return [layer.mamba for layer in self.layers if isinstance(layer, FalconH1DecoderLayer)]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().compute_logits(hidden) * self.lm_head_multiplier

    def checkpoint_names(self, weights: Iterable[tuple[str, torch.Tensor]]):
        """Bamba's renames, and the multipliers folded (``_fold``). Here, not in
        ``load_weights``: the quantized loader hands a quantized layer's tensors to its method
        straight after this call (``quantization/loading.py``)."""
        return self._fold(bamba_names(weights))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded: set[str] = set()
        named = self.checkpoint_names(weights)
        loaded |= super().load_weights(load_mamba_tensors(self.layers, named, loaded))
        return loaded

    def _fold(self, weights):
        """Each tensor of a projection a multiplier scales, scaled (module docstring). Both
        loaders call ``checkpoint_names``, and llama's ``load_weights`` calls it again on what
        they pass on, so a tensor scaled here carries a mark and is never scaled twice."""
        for name, tensor in weights:
            layer, _, piece = name.rpartition(".")
            fold = self._folds.get(".".join(layer.split(".")[-2:]))  # e.g. "self_attn.k_proj"
            if fold is not None and not getattr(tensor, _FOLDED, False):
                scaled = fold_multiplier(layer, piece, tensor, *fold, self._block_rows)
                if scaled is not tensor:
                    setattr(scaled, _FOLDED, True)
                    tensor = scaled
            yield name, tensor


_FOLDED = "_falcon_h1_folded"  # set on a tensor _fold scaled


def fold_multiplier(layer: str, piece: str, tensor, weight_factor, bias_factor,
                    block_rows: int | None = None):
    """Checkpoint tensor ``piece`` of ``layer`` with the layer's multipliers folded in: the
    weight's rows times ``weight_factor`` (a float, or one value a row), the bias's times
    ``bias_factor``. A quantized weight keeps its codes and takes the factor in its scales,
    ``w = codes * scale``: fp8 ``weight_scale`` (per tensor, or a row; a per-tensor scale under
    a factor a row becomes one a row), block ``weight_scale_inv`` (a factor constant on each
    ``block_rows``-row block: the stored parts of ``in_proj`` start on blocks), AWQ / GPTQ
    ``scales [G, N]`` (a column per output); ``qweight``, ``qzeros``, ``g_idx`` and input
    scales pass unchanged."""
    factor = bias_factor if piece == "bias" else weight_factor
    dense = piece in ("weight", "bias")
    if factor is None or piece not in ("weight", "bias", "weight_scale", "weight_scale_inv",
                                       "scales"):
        return tensor
    tensor = materialize(tensor)  # (a new tensor each time: never marked yet)
    if dense and not (tensor.is_floating_point() and tensor.element_size() > 1):
        return tensor  # fp8 / int8 codes: the factor goes into their scale
    out = tensor.float()
    if isinstance(factor, torch.Tensor):
        if piece == "scales":  # int4 [G, N]: outputs are columns
            out = out * factor[None, :]
        elif piece == "weight_scale_inv":
            out = out * _block_factor(layer, factor, block_rows, out.shape[0])[:, None]
        elif piece == "weight_scale" and out.numel() == 1:
            out = out.reshape(()) * factor  # one scale a row from here on
        else:
            out = out * factor.view(-1, *[1] * (out.dim() - 1))
    else:
        out = out * factor
    return out if not dense else out.to(tensor.dtype)  # scales: float32 (no second rounding)


def _block_factor(layer: str, factor: torch.Tensor, block_rows: int | None, blocks: int):
    """A row factor as one value per block of ``block_rows`` rows (refused where a block's rows
    differ: its one scale cannot carry two multipliers)."""
    rows = block_rows or factor.numel()
    padded = torch.cat([factor, factor[-1:].expand(blocks * rows - factor.numel())])
    per_block = padded.view(blocks, rows)
    if not bool((per_block == per_block[:, :1]).all()):
        raise ValueError(f"{layer}: Falcon-H1's ssm_multipliers differ inside one block of "
                         f"{rows} rows of this block-wise fp8 weight, so its scales cannot carry "
                         "them; load the unquantized checkpoint (quantization='fp8' quantizes it "
                         "on load).")
    return per_block[:, 0]


def falcon_mamba_shape(config):
    if not config.mamba_rms_norm:
        gate_norm = "none"
    else:
        gate_norm = "before_gate" if config.mamba_norm_before_gate else "after_gate_float32"
    return dataclasses.replace(hybrid_mamba_shape(config), out_bias=bool(config.projectors_bias),
                               gate_norm=gate_norm)


def _multiplier_folds(config) -> dict[str, tuple]:
    """Layer name suffix -> (its weight's factor, its bias's factor): a float, one value a row
    (``in_proj``), or None where the multipliers leave it unchanged."""
    attn_in, key = float(config.attention_in_multiplier), float(config.key_multiplier)
    attn_out, ssm_out = float(config.attention_out_multiplier), float(config.ssm_out_multiplier)
    gate, down = (float(m) for m in config.mlp_multipliers)
    mup = _mup_vector(config)
    folds = {"self_attn.q_proj": (attn_in, None), "self_attn.k_proj": (attn_in * key, key),
             "self_attn.v_proj": (attn_in, None), "self_attn.o_proj": (attn_out, attn_out),
             "mamba.out_proj": (ssm_out, ssm_out), "mlp.gate_proj": (gate, gate),
             "mlp.down_proj": (down, down),
             "mamba.in_proj": (mup * float(config.ssm_in_multiplier), mup)}
    one = lambda f: f is None or (isinstance(f, float) and f == 1.0)  # noqa: E731
    folds = {k: tuple(None if one(f) else f for f in v) for k, v in folds.items()}
    return {k: v for k, v in folds.items() if v != (None, None)}


def _mup_vector(config) -> torch.Tensor:
    """The mixer's per-row multipliers of ``in_proj``: ``ssm_multipliers`` over its
    ``[z: I | x: I | B: G*N | C: G*N | dt: H]`` rows (HF's ``compute_mup_vector``)."""
    shape = hybrid_mamba_shape(config)
    sizes = [shape.intermediate] * 2 + [shape.n_groups * shape.d_state] * 2 + [shape.num_heads]
    multipliers = [float(m) for m in config.ssm_multipliers]
    if len(multipliers) != 5:
        raise ValueError(f"Falcon-H1 ssm_multipliers has {len(multipliers)} entries; it needs 5 "
                         "(z, x, B, C, dt).")
    return torch.cat([torch.full((n,), m) for n, m in zip(sizes, multipliers)])
