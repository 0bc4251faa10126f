"""Tiny DeepSeek-V3 / GLM-4.5 / ERNIE 4.5 MoE checkpoints with a multi-token-prediction module,
built from HF configs (ERNIE's in its own names, ``ernie_name``, and with its decoder layer
dense): HF's model with one layer more (whose tensors become the MTP module's decoder layer,
``model.layers.<N>.*``) saved, then the config cut back to ``N`` layers with
``num_nextn_predict_layers = 1`` and the MTP module's own tensors (enorm, hnorm, eh_proj,
shared_head.norm / head, embed_tokens) added, random. ``predictable``: every attention and
MLP output projection zero (target and MTP layer), ``eh_proj = [I | 0]``, enorm ones and
shared_head.norm the target's final norm: the target is a bigram model and the MTP module
predicts its next token exactly (its logits are the target's times a positive scale):
the MTP layer's output is ``enorm(embed(t[p+1]))``, the target's residual stream at ``p + 1``
up to a positive scale."""

from __future__ import annotations

import copy
import json
import os

import torch
from safetensors.torch import load_file, save_file

from tests.models.test_deepseek import save_deepseek


def save_with_mtp(config, path: str, seed: int = 0, predictable: bool = False,
                  noise: float = 0.0, shared_copies: bool = True) -> str:
    """``noise`` (with ``predictable``): the MTP layer's shared experts' down_proj random at
    that scale, so its drafts only partly agree with the target."""
    n = config.num_hidden_layers
    big = copy.deepcopy(config)
    big.num_hidden_layers = n + 1
    ernie = is_ernie(config)
    if ernie:  # the MTP layer dense (vLLM's reading of ERNIE's MTP block)
        end = config.moe_layer_end_index
        big.moe_layer_end_index = n - 1 if end is None or end < 0 else min(end, n - 1)
    save_deepseek(big, path, seed)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(num_hidden_layers=n, num_nextn_predict_layers=1)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    file = os.path.join(path, "model.safetensors")
    t = load_file(file)
    h = config.hidden_size
    gen = torch.Generator().manual_seed(seed + 1)
    pre = f"model.layers.{n}."
    t[pre + "enorm.weight"] = 0.5 + torch.rand(h, generator=gen)
    t[pre + "hnorm.weight"] = 0.5 + torch.rand(h, generator=gen)
    t[pre + "eh_proj.weight"] = torch.randn(h, 2 * h, generator=gen) * 0.2
    t[pre + "shared_head.norm.weight"] = 0.5 + torch.rand(h, generator=gen)
    head = t.get("lm_head.weight", t["model.embed_tokens.weight"])
    if shared_copies:  # as released: copies of the target's embedding and LM head
        t[pre + "shared_head.head.weight"] = head.clone()
        t[pre + "embed_tokens.weight"] = t["model.embed_tokens.weight"].clone()
    if predictable:
        for name in t:
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                t[name] = torch.zeros_like(t[name])
        t[pre + "eh_proj.weight"] = torch.cat([torch.eye(h), torch.zeros(h, h)], dim=1)
        t[pre + "enorm.weight"] = torch.ones(h)
        t[pre + "shared_head.norm.weight"] = t["model.norm.weight"].clone()
        if noise:
            name = pre + "mlp.shared_experts.down_proj.weight"
            t[name] = torch.randn(t[name].shape, generator=gen) * noise
    if ernie:  # PaddleFormers' names: mtp_block.0 and the parts as mtp_*.0, no shared head
        t = {ernie_name(k, n): v for k, v in t.items()
             if not k.startswith((pre + "shared_head.", pre + "embed_tokens."))}
    save_file({k: v.contiguous() for k, v in t.items()}, file, metadata={"format": "pt"})
    return path


def is_ernie(config) -> bool:
    return type(config).__name__.startswith("Ernie4_5")


ERNIE_PARTS = {"enorm": "model.mtp_emb_norm.0", "hnorm": "model.mtp_hidden_norm.0",
               "eh_proj": "model.mtp_linear_proj.0"}


def ernie_name(name: str, n: int) -> str:
    """A DeepSeek-layout MTP name as ERNIE 4.5's checkpoints spell it."""
    pre = f"model.layers.{n}."
    if not name.startswith(pre):
        return name
    rest = name[len(pre):]
    part, _, attr = rest.partition(".")
    if part in ERNIE_PARTS:
        return f"{ERNIE_PARTS[part]}.{attr}"
    return "model.mtp_block.0." + rest
