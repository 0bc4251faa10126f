"""Qwen2-Audio (``Qwen2AudioForConditionalGeneration``): a Whisper-style audio encoder, a
linear projector and a Qwen2 language model (tessellm's own, paged attention). Each clip's
features enter the language model as embeddings at its ``<|AUDIO|>`` placeholders::

    log-mel [mel, 2P] --conv1 (k3) + gelu--> [d, 2P] --conv2 (k3, stride 2) + gelu--> [d, P]
      + positions [P, d] -> encoder layers (pre-LN, bidirectional attention over the clip's
      first (L-1)//2+1 positions: L = its mel frames, the rest is padding) -> avg-pool 2
      -> layer norm -> projector -> the first ((L-1)//2+1-2)//2+1 rows = its placeholders

(P = ``max_source_positions``: the feature extractor pads every clip to its 30 s window, 3000
frames for Qwen2-Audio-7B, 750 placeholders at most.) HF's and vLLM's encoder do the same;
the runner's encoder cache (``tessellm.multimodal.encoder_cache``) calls ``encode_images``
once per clip, when a step first reaches its placeholders.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from tessellm.layers.context import ModelContext
from tessellm.models import llama
from tessellm.models.image_embeds import ImageTextModel


def audio_token_id(config) -> int:
    for name in ("audio_token_id", "audio_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError("The Qwen2-Audio config has no audio_token_index / audio_token_id; is it complete?")


def audio_output_length(frames: int) -> int:
    """Placeholder tokens of a clip of ``frames`` mel frames (HF's
    ``_get_feat_extract_output_lengths``: conv2's stride, then the 2x pool)."""
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


def max_audio_tokens(config) -> int:
    """Placeholders of the longest clip: a whole window (``max_source_positions`` encoder
    positions, pooled by 2)."""
    return audio_output_length(2 * config.audio_config.max_source_positions)


class AudioAttention(nn.Module):
    """Whisper's: q, v, out with bias, k without; q scaled before the product."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def split(y):
            return y.view(b, t, self.heads, self.head_dim).transpose(1, 2)

        q = split(self.q_proj(x) * self.head_dim ** -0.5)
        out = F.scaled_dot_product_attention(q, split(self.k_proj(x)), split(self.v_proj(x)),
                                             attn_mask=mask, scale=1.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class AudioEncoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.self_attn = AudioAttention(cfg.d_model, cfg.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)
        if cfg.activation_function != "gelu":
            raise ValueError(f"Qwen2-Audio encoder activation {cfg.activation_function!r} is not "
                             "supported; the checkpoints use 'gelu'.")

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        if x.dtype == torch.float16:  # HF's (and so vLLM's) encoder layer: no inf in float16
            limit = torch.finfo(x.dtype).max - 1000
            x = x.clamp(-limit, limit)
        return x


class Qwen2AudioEncoder(nn.Module):
    """``[N, mel, 2P]`` log-mel features and each clip's frame count -> ``[N, P/2, d]``."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.d_model
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(cfg.max_source_positions, d)
        self.layers = nn.ModuleList(AudioEncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(d)
        self.num_frames = 2 * cfg.max_source_positions

    def forward(self, features: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        if features.shape[-1] != self.num_frames:
            raise ValueError(f"The audio features have {features.shape[-1]} mel frames but the "
                             f"encoder takes {self.num_frames}; the checkpoint's feature extractor "
                             "(chunk_length) does not match its config.json.")
        x = F.gelu(self.conv1(features))
        x = F.gelu(self.conv2(x)).permute(0, 2, 1)
        x = x + self.embed_positions.weight
        valid = (frames - 1) // 2 + 1  # encoder positions that hold the clip
        keys = torch.arange(x.shape[1], device=x.device)[None, :] < valid[:, None]
        mask = keys[:, None, None, :]  # [N, 1, 1, P]: every query sees the clip's positions
        for layer in self.layers:
            x = layer(x, mask)
        x = F.avg_pool1d(x.permute(0, 2, 1), 2, 2).permute(0, 2, 1)
        return self.layer_norm(x)


class Qwen2AudioProjector(nn.Module):
    def __init__(self, audio_dim: int, text_dim: int):
        super().__init__()
        self.linear = nn.Linear(audio_dim, text_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class Qwen2AudioForConditionalGeneration(ImageTextModel):
    """``forward`` (the audio features at their placeholder rows), ``compute_logits``,
    ``attention_layers``: ``ImageTextModel``'s; the encoder cache calls ``encode_images``
    with each clip's mel features and frame count."""

    def __init__(self, config, ctx: ModelContext):
        super().__init__()
        self.config = config
        text, audio = config.text_config, config.audio_config
        if getattr(text, "model_type", "qwen2") != "qwen2":
            raise ValueError(f"Qwen2-Audio with a {text.model_type!r} language model is not "
                             "supported; tessellm runs its Qwen2 one.")
        if getattr(audio, "scale_embedding", False):
            raise ValueError("Qwen2-Audio with scale_embedding is not supported (HF's encoder "
                             "never applies it either).")
        self.tower_here = ctx.pp.is_first
        self.audio_token_id = audio_token_id(config)
        self.max_tokens = max_audio_tokens(config)
        if self.tower_here:
            self.audio_tower = Qwen2AudioEncoder(audio)
            self.multi_modal_projector = Qwen2AudioProjector(audio.d_model, text.hidden_size)
        self.language_model = llama.Qwen2ForCausalLM(text, ctx)

    # -- what the runner calls -------------------------------------------------------------

    def encode_images(self, features: torch.Tensor, frames=None) -> list[torch.Tensor]:
        """``[N, mel, 2P]`` log-mel features and each clip's mel frame count -> per clip its
        placeholder features ``[audio_output_length(frames), text hidden]``."""
        dtype = self.audio_tower.conv1.weight.dtype
        lengths = torch.tensor(frames, device=features.device)
        out = self.multi_modal_projector(self.audio_tower(features.to(dtype), lengths))
        return [o[:audio_output_length(int(n))] for o, n in zip(out, frames)]

    def dummy_images(self, num_tokens: int, device) -> tuple[torch.Tensor, list]:
        """Silent whole-window clips covering ``num_tokens`` placeholders, for the memory profile."""
        n = max(1, -(-num_tokens // self.max_tokens))
        tower = self.audio_tower
        return (torch.zeros(n, tower.conv1.in_channels, tower.num_frames, device=device),
                [tower.num_frames] * n)

    # -- weights ---------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF names: ``audio_tower.*``, ``multi_modal_projector.*``, ``language_model.model.*``
        and ``language_model.lm_head.*`` (the Qwen checkpoints' and transformers' saved
        layout), or transformers 5's in-memory ``model.*`` / ``lm_head.*`` one."""
        return self.load_routed_weights(weights, route=route_weight)


def route_weight(name: str):
    if name.startswith("model."):
        name = name[len("model."):]
    if name.startswith("lm_head."):
        return "language_model", name
    for part in ("audio_tower", "multi_modal_projector", "language_model"):
        if name.startswith(part + "."):
            return part, name[len(part) + 1:]
    return None
