"""What the engine does differently for models with Mamba (state-space) layers, in one place;
gated DeltaNet layers (Qwen3-Next's linear attention) hold the same kind of state and follow
the same rules.

Such a model keeps, besides any paged KV cache of its attention layers, one recurrent state
per running request and Mamba layer (``core/mamba_state.py``). That state summarizes every
token before it and cannot be rebuilt from a block hash, so:

- prefix caching keeps copies of the state at block boundaries beside the cached KV blocks, and
  a hit ends where a copy is kept (``core/state_prefix.py``; the pool: ``state_snapshots``);
  the host KV tier (``kv_offloading_size``) and a KV connector (``kv_transfer_config``) do not
  carry those copies and are refused;
- speculative decoding keeps the state after each verified token in a spare slot and, once
  the drafts are checked, the one after the accepted prefix (``core/mamba_state.py``,
  ``backends/reference/recurrent_verify.py``); n-gram, replay and MTP drafts (Qwen3-Next's
  ``mtp.*`` layer, ``models/mtp.py``), EAGLE-1 and EAGLE-3 heads (EAGLE-3 reads the residual
  stream entering the chosen layers, Mamba / DeltaNet or attention alike) and attention-only
  draft models are served, recurrent draft models not yet; verify steps in which every request
  verifies as many drafts replay verify graphs (state and token slots graph inputs); with
  prefix caching, the state after the accepted tokens is kept at the block boundaries they
  cross (``core/state_prefix.py``);
- int8 / fp8 / AWQ / GPTQ quantization runs on the linear projections only
  (``_quantization_refused``: the conv, A_log, D, dt_bias and norms stay in the model dtype,
  as vLLM keeps them);
- LoRA runs on Bamba's and Granite 4.0-H's attention, MLP (Bamba) and Mamba in/out
  projections, Nemotron-H's attention, MLP and Mamba in_proj, and Qwen3-Next's attention and
  DeltaNet projections (``lora/families.py``), is refused for Mamba2 and Falcon-H1; pipeline parallelism
  splits the layers into stages, each holding the states of its own layers (tensor
  parallelism splits the Mamba heads: ``layers/mamba_mixer.py``, and the gated DeltaNet heads:
  ``layers/gated_deltanet.py``);
- decode steps run eagerly unless ``TESSELLM_RECURRENT_STATE_GRAPHS`` says otherwise
  (``envs.recurrent_state_device_graphs``: the state slots are a graph input of their own).

Preemption needs nothing special: a preempted request's slot is freed and the request is
recomputed from its first token, which rebuilds its state exactly.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

STATE_SPACE_ARCHITECTURES = frozenset({"Mamba2ForCausalLM", "GraniteMoeHybridForCausalLM",
                                       "BambaForCausalLM", "NemotronHForCausalLM",
                                       "FalconH1ForCausalLM"})
# Not Mamba, the same engine rules: gated DeltaNet layers keep a per-request recurrent state too
LINEAR_ATTENTION_ARCHITECTURES = frozenset({"Qwen3NextForCausalLM"})
_RECURRENT = STATE_SPACE_ARCHITECTURES | LINEAR_ATTENTION_ARCHITECTURES


def has_recurrent_state(config) -> bool:
    return bool(_RECURRENT & set(getattr(config, "architectures", None) or ()))


def check_engine_args(args, config) -> None:
    """Refuse, before any worker starts, what these models cannot do yet (one sentence each)."""
    from tessellm.lora.families import family_of

    if not has_recurrent_state(config):
        return
    arch = next(a for a in config.architectures if a in _RECURRENT)
    layers = ("gated DeltaNet" if arch in LINEAR_ATTENTION_ARCHITECTURES else "Mamba") + " layers"
    method = _spec_method(getattr(args, "speculative_config", None))
    refused = [
        (method is not None and method not in SPEC_METHODS,
         f"speculative decoding with method {method!r}",
         f"use method {', '.join(SPEC_METHODS)}"),
        (getattr(args, "enable_lora", False) and family_of([arch])[1] is None, "LoRA",
         "drop enable_lora (Bamba, Granite 4.0-H, Nemotron-H and Qwen3-Next take adapters)"),
        (getattr(args, "kv_offloading_size", None) is not None, "KV offloading",
         "the host tier keeps evicted KV blocks but not the recurrent-state snapshots a prefix "
         "hit of these layers starts from; drop kv_offloading_size"),
        (getattr(args, "kv_transfer_config", None) is not None, "a KV connector",
         "it moves KV blocks but not the recurrent-state snapshots a prefix hit of these layers "
         "starts from; drop kv_transfer_config"),
        _quantization_refused(args, config, arch),
    ]
    for bad, what, fix in refused:
        if bad:
            raise ValueError(f"{arch} ({layers} with a per-request recurrent state) does not "
                             f"support {what} yet; {fix}.")


# speculative decoding methods served over a recurrent target (the others are refused)
SPEC_METHODS = ("ngram", "mtp", "draft_model", "eagle", "eagle3", "replay")


def _spec_method(value):
    """The speculative_config's method (MTP aliases folded), or None without one."""
    from tessellm.spec_decode.config import parse_speculative_config

    config = parse_speculative_config(value)
    return None if config is None else config.method


# served: the linear projections in int8 / fp8 (per tensor, channel or block; quantized on load
# or from such a checkpoint) or AWQ / GPTQ int4 (from such a checkpoint: stored multi-part
# tensors cut by output columns, ``quantization/stored_parts.py``), the recurrent kernels' small
# parameters kept in the model dtype
_QUANT_SERVED = {"int8", "fp8", "fp8_e4m3", "fbgemm_fp8", "fp8_block", "w8a16",
                 "int8_weight_only", "compressed-tensors", "awq", "gptq"}


def _quantization_refused(args, config, arch: str) -> tuple[bool, str, str]:
    """The quantization entry of ``check_engine_args``' table: refused unless every scheme asked
    for (by the user or the checkpoint) is one the hybrid layers are built for."""
    from tessellm.quantization.config import checkpoint_quant_config

    asked = getattr(args, "quantization", None)
    ckpt = checkpoint_quant_config(config) or {}
    schemes = {str(s).lower() for s in (asked, ckpt.get("quant_method")) if s not in (None, "")}
    schemes -= {"none", "auto"}
    if "gptq" in schemes and ckpt.get("desc_act"):
        return (True, "GPTQ act-order (desc_act)", "its stored multi-part projections are cut "
                "without the act-order permutation tested; use a GPTQ checkpoint quantized with "
                "desc_act=false, AWQ or fp8")
    bad = sorted(schemes - _QUANT_SERVED)
    return (bool(bad), f"quantization {', '.join(bad)}",
            "they serve int8, fp8, AWQ and GPTQ (quantization='fp8', 'fp8_block' or 'int8', or "
            "an fp8, AWQ or GPTQ checkpoint); load one of those or an unquantized checkpoint")


def state_snapshots(enabled: bool, config, executor):
    """Prefix caching for a recurrent-state model: the snapshot pool's bookkeeping
    (``StateSnapshots``, ``core/state_prefix.py``) with the workers' pools allocated, or None
    (prefix caching off: not asked for, not such a model, or no memory for a snapshot)."""
    if not enabled or not has_recurrent_state(config):
        return None
    num = min(executor.collective_rpc("state_snapshot_slots"))  # each rank set memory aside
    if num < 1:
        logger.info("Prefix caching is off for %s: no memory is set aside for recurrent-state "
                    "snapshots (recurrent_state_snapshots=0, or a KV budget too small).",
                    ", ".join(config.architectures))
        return None
    from tessellm.core.state_prefix import StateSnapshots

    executor.collective_rpc("initialize_state_snapshots", num)
    logger.info("Prefix caching keeps up to %d recurrent-state snapshots at block boundaries.", num)
    return StateSnapshots(num)


def check_time_step_limit(limit) -> tuple[float, float]:
    """The config's ``time_step_limit`` (dt clamp) as a tuple; only the default (0, inf) is
    served: HF transformers clamps dt in its chunked (prefill) path but not in its single-step
    (decode) path, so a clamp that bites has no one meaning to match."""
    lo, hi = (float(v) for v in (limit or (0.0, float("inf"))))
    if lo > 0.0 or hi != float("inf"):
        raise ValueError(f"time_step_limit={list(limit)} is not supported; only the default "
                         "[0.0, inf] is (HF transformers applies the clamp to prefill but not to "
                         "decode steps).")
    return lo, hi
