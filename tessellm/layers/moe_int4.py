"""AWQ / GPTQ int4 MoE experts (W4A16): how a ``FusedMoE`` stores them and fills them.

In memory (the contract's int4 experts, ``backends/reference/moe.py``), per expert the rows of
the float layout (``w13``: gate rows then up rows; L: this rank's slice of the intermediate
size) with their inputs K packed 8 codes per int32, low nibble first, and per group of
``group`` inputs a scale and a zero code::

    w13        int32 [E, 2L, H/8]    w13_scale [E, 2L, H/g]   w13_zeros uint8 [E, 2L, H/g]
    w2         int32 [E, H, L/8]     w2_scale  [E, H, L/g]    w2_zeros  uint8 [E, H, L/g]

    w[e, n, k] = (q[e, n, k] - zeros[e, n, k // g]) * scale[e, n, k // g]

Checkpoints store one projection of one expert per tensor set, K inputs and N outputs
(``quantization/int4.py``): AWQ ``qweight [K, N/8]`` (packed along N in AWQ's order),
``qzeros [K/g, N/8]``, ``scales [K/g, N]``; GPTQ ``qweight [K/8, N]`` (packed along K),
``qzeros [K/g, N/8]`` (v1 stores zero - 1), ``scales``, ``g_idx [K]``. Each is unpacked,
turned to the rows above and cut to this rank's part (w13: its rows; w2: its inputs, whole
groups), then packed again along K. Scales keep the checkpoint's precision (float16, or
float32 in a float32 model).

GPTQ act-order (``desc_act``: a ``g_idx`` other than ``k // g``, each group's g inputs spread
over K) is served by the standard trick, once every tensor of the layer is in (``missing``):
each projection's inputs are sorted by group (``quantization.int4.act_order_perm``), so the
codes take the layout above with the checkpoint's scales and zeros as they are. The down
projection's order ``p2`` (over the intermediate size) costs nothing at run time: the gate and
up rows of ``w13`` (codes, scales, zeros) are permuted by ``p2`` as well, so the activation
comes out in ``w2``'s sorted input order. The gate / up order ``p13`` (over hidden, one per
expert: gate and up share it, as they share their inputs) is kept as ``w13_perm [E, H]`` and
the op gathers each expert's x through it (plugin API 20, ``reference/moe.py``). Refused: gate
and up with different orders, and act-order experts cut across ranks (tensor parallelism
without expert parallelism: a rank's slice of the intermediate size is not a set of whole
sorted groups). Layers the checkpoint leaves unquantized (``modules_to_not_convert``, GPTQ's
``dynamic`` "-:" rules, or experts no int4 tool quantizes: stacked 3-D expert parameters)
keep float experts: ``experts_excluded``.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from tessellm.quantization.int4 import act_order_perm, unpack_awq, unpack_gptq_zeros
from tessellm.quantization.packed import pack_int4, quantize_int4, unpack_int4

INT4_KINDS = ("awq", "gptq")
_ATTRS = ("qweight", "qzeros", "scales")


def group_of(quant, k: int) -> int:
    """The group size over ``k`` inputs (the whole row for per-channel: -1 / 0, or > k)."""
    g = quant.group_size
    return k if g in (-1, 0) or g > k else g


def experts_excluded(spec, names: list[str]) -> bool:
    """Whether the checkpoint of ``spec`` (awq / gptq, or bitsandbytes: its
    ``llm_int8_skip_modules``) leaves the expert projections named
    ``names`` (full HF module names of one layer's experts) unquantized: every name matches
    an entry of ``modules_to_not_convert`` (a dotted component path, or a regex of the whole
    name) or a GPTQ ``dynamic`` "-:" rule. Some but not all: refused (one layer's experts are
    stored one way)."""
    ckpt = (spec.config.get("checkpoint") or {}) if spec is not None else {}
    skip = [str(m) for m in (ckpt.get("modules_to_not_convert") or [])
            + (ckpt.get("llm_int8_skip_modules") or [])]
    dynamic = ckpt.get("dynamic") or {}
    hits = [_skipped(name, skip, dynamic) for name in names]
    if any(hits) and not all(hits):
        raise ValueError(f"The checkpoint's quantization_config leaves some expert projections "
                         f"of one layer unquantized (e.g. {names[hits.index(True)]}) and "
                         f"quantizes others (e.g. {names[hits.index(False)]}); tessellm keeps "
                         "a layer's experts one way: quantize all of them or none.")
    for name in names:
        _check_dynamic_override(name, dynamic)
    return bool(hits) and all(hits)


def _skipped(name: str, skip: list[str], dynamic: dict) -> bool:
    for entry in skip:
        if (name == entry or name.endswith("." + entry) or f".{entry}." in f".{name}."
                or _fullmatch(entry, name)):
            return True
    return any(key.startswith("-:") and re.match(key[2:], name) for key in dynamic)


def _fullmatch(pattern: str, name: str) -> bool:
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _check_dynamic_override(name: str, dynamic: dict) -> None:
    """A GPTQ ``dynamic`` "+:" rule giving experts other bits or group size: refused."""
    for key, override in dynamic.items():
        pattern = key[2:] if key.startswith("+:") else key
        if key.startswith("-:") or not re.match(pattern, name):
            continue
        if any(k in (override or {}) for k in ("bits", "group_size", "desc_act", "sym")):
            raise ValueError(f"The GPTQ checkpoint's dynamic rule {key!r} gives {name} its own "
                             f"settings {override}; per-module int4 settings on MoE experts are "
                             "not supported: use a checkpoint with one setting for all experts.")


def allocate(moe, quant, num_experts: int, hidden: int) -> None:
    """int4 ``w13`` / ``w2`` with their scales and zeros on ``moe`` (``moe.local`` is L)."""
    local, whole_i = moe.local, moe.local * (moe.tp.size if moe.sliced else 1)
    g13, g2 = group_of(quant, hidden), group_of(quant, whole_i)
    if hidden % 8 or hidden % g13:
        raise ValueError(f"int4 experts need hidden_size {hidden} to be a multiple of 8 and of "
                         f"the group size {g13}; the config does not match the weights.")
    # a rank's inputs of the down projection: whole groups, or a part of one group (a rank
    # keeps one scale per row then; a slice across two groups would take the first's alone)
    if local % 8 or (local % g2 if local >= g2 else g2 % local or whole_i % g2):
        raise ValueError(f"int4 experts need each rank's intermediate size ({local} at "
                         f"tensor_parallel_size={moe.tp.size if moe.sliced else 1}) to be a "
                         f"multiple of 8 and of the group size {g2} (or to divide it); use a "
                         "tensor_parallel_size that leaves whole groups per rank.")
    groups2 = max(1, local // g2)
    scale_dtype = torch.float32 if torch.get_default_dtype() == torch.float32 else torch.float16

    def param(*shape, dtype, fill=0):
        return torch.nn.Parameter(torch.full(shape, fill, dtype=dtype), requires_grad=False)

    moe.w13 = param(num_experts, 2 * local, hidden // 8, dtype=torch.int32)
    moe.w2 = param(num_experts, hidden, local // 8, dtype=torch.int32)
    moe.w13_scale = param(num_experts, 2 * local, hidden // g13, dtype=scale_dtype)
    moe.w2_scale = param(num_experts, hidden, groups2, dtype=scale_dtype)
    moe.w13_zeros = param(num_experts, 2 * local, hidden // g13, dtype=torch.uint8, fill=8)
    moe.w2_zeros = param(num_experts, hidden, groups2, dtype=torch.uint8, fill=8)
    # GPTQ act order: each expert's w13 input order [E, H] once a layer has one, else None (a
    # buffer: it moves with the module)
    if isinstance(moe, torch.nn.Module):
        moe.register_buffer("w13_perm", None, persistent=False)
    else:
        moe.w13_perm = None
    moe.act_order = {}  # (expert, name, shard) -> the sorting permutation, until ``missing``


def load(moe, expert: int, name: str, shard: Optional[int], attr: str, src: torch.Tensor,
         start: int, where: str) -> list[str]:
    """One checkpoint tensor (``attr``: qweight, qzeros, scales, g_idx) of ``expert``'s
    projection (``name`` "w13" with ``shard`` 0 gate / 1 up, or "w2"), ``src`` whole as
    stored; ``start``: this rank's first intermediate row. Returns the parameters filled."""
    quant, local = moe.quant, moe.local
    k = getattr(moe, name).shape[2] * 8 * (moe.tp.size if name == "w2" and moe.sliced else 1)
    group = group_of(quant, k)
    if attr == "g_idx":
        if src.numel() != k:
            raise ValueError(f"{where}.g_idx has {src.numel()} entries in the checkpoint for "
                             f"{k} inputs; the config does not match the weights.")
        try:
            perm = act_order_perm(src, group)
        except ValueError as e:
            raise ValueError(f"{where}: {e} Use a GPTQ checkpoint quantized with "
                             "desc_act=false, or AWQ.") from None
        if perm is None:
            return []
        if moe.sliced:
            raise ValueError(f"{where} is GPTQ act-order (desc_act) and "
                             f"tensor_parallel_size={moe.tp.size} would cut each expert's "
                             "intermediate size across ranks, which act-order groups do not "
                             "allow; use enable_expert_parallel (whole experts per rank), "
                             "tensor_parallel_size=1, or a desc_act=false checkpoint.")
        moe.act_order[(expert, name, shard)] = perm
        return []
    if attr == "weight":
        raise ValueError(f"{where} is stored unquantized in a {quant.kind.upper()} checkpoint "
                         "whose experts are int4 elsewhere; a layer's experts must be all int4 "
                         "or all float (list them in modules_to_not_convert to keep them "
                         "float).")
    if attr not in _ATTRS:
        raise ValueError(f"{where}.{attr} has no place in {quant.kind.upper()} int4 experts "
                         "(they take qweight, qzeros, scales and g_idx); is the "
                         "quantization_config right for these weights?")
    rows_of = _rows(name, shard, local)
    t = _unpacked(quant, attr, src)  # [N, K] codes, or [N, G] zeros / scales
    want = k if attr == "qweight" else k // group
    if t.shape != (t.shape[0], want):
        raise ValueError(f"{where}.{attr} has shape {tuple(src.shape)} in the checkpoint, which "
                         f"does not hold {want} {'inputs' if attr == 'qweight' else 'groups'} "
                         f"of the {quant.kind.upper()} experts (group size {group}); the config "
                         "does not match the weights.")
    if name == "w13":
        t = t[start:start + local] if moe.sliced else t
    elif moe.sliced:  # this rank's inputs of the down projection: whole groups
        t = (t[:, start:start + local] if attr == "qweight"
             else t[:, start // group:start // group + max(1, local // group)])
    dst_name = {"qweight": name, "qzeros": f"{name}_zeros", "scales": f"{name}_scale"}[attr]
    dst = getattr(moe, dst_name).data[expert, rows_of]
    if attr == "qweight":
        t = pack_int4(t.t()).t()
    if tuple(dst.shape) != tuple(t.shape):
        raise ValueError(f"{where}.{attr} has shape {tuple(src.shape)} in the checkpoint, which "
                         f"does not fit {tuple(dst.shape)} on this rank; the config does not "
                         "match the weights.")
    dst.copy_(t)
    moe.awaiting_scale.discard((expert, name, shard, attr))
    return [dst_name]


def _unpacked(quant, attr: str, src: torch.Tensor) -> torch.Tensor:
    """A checkpoint tensor in the experts' orientation: ``[N, K]`` codes (qweight) or
    ``[N, G]`` zero codes / scales."""
    if attr == "scales":
        return src.t().float()
    if attr == "qweight":
        q = unpack_awq(src) if quant.kind == "awq" else unpack_int4(src)
        return q.t()
    z = (unpack_awq(src) if quant.kind == "awq"
         else unpack_gptq_zeros(src).to(torch.int32) + quant.zero_offset)
    return z.t().to(torch.uint8)


def _rows(name: str, shard: Optional[int], local: int) -> slice:
    return slice(0, None) if name == "w2" else slice(shard * local, (shard + 1) * local)


def expect(moe) -> None:
    """Mark every tensor of this rank's int4 experts as awaited (``missing``)."""
    for e in range(moe.w13.shape[0]):
        for name, shard in (("w13", 0), ("w13", 1), ("w2", None)):
            for attr in _ATTRS:
                moe.awaiting_scale.add((e, name, shard, attr))


def missing(moe, prefix: str) -> None:
    """Refuse int4 experts whose qweight, qzeros or scales the checkpoint never gave; then
    sort the inputs of GPTQ act-order experts (module docstring)."""
    if moe.awaiting_scale:
        expert, name, shard, attr = sorted(moe.awaiting_scale, key=str)[0]
        part = {("w13", 0): "gate", ("w13", 1): "up", ("w2", None): "down"}[(name, shard)]
        raise ValueError(f"The {moe.quant.kind.upper()} checkpoint has no {attr} for the {part} "
                         f"projection of expert {moe.expert_ids[expert]} in {prefix}; is it "
                         "complete?")
    if moe.act_order:
        _sort_act_order(moe, prefix)


def _sort_act_order(moe, prefix: str) -> None:
    """Each act-order projection's inputs sorted by group; the down projection's order folded
    into w13's gate and up rows, the gate / up order kept as ``w13_perm`` (module docstring).
    Consumes ``moe.act_order`` (a second call does nothing)."""
    pending, moe.act_order = moe.act_order, {}
    num_experts, hidden, local = moe.w13.shape[0], moe.w13.shape[2] * 8, moe.local
    perm13 = None
    for e in range(num_experts):
        gate, up = pending.get((e, "w13", 0)), pending.get((e, "w13", 1))
        down = pending.get((e, "w2", None))
        if (gate is None) != (up is None) or (gate is not None and not torch.equal(gate, up)):
            raise ValueError(f"The gate and up projections of expert {moe.expert_ids[e]} in "
                             f"{prefix} have different GPTQ act-order g_idx; tessellm keeps "
                             "them as one int4 matrix over their common inputs, which needs one "
                             "input order (GPTQ gives them one when both see the same "
                             "calibration inputs): use such a checkpoint, or desc_act=false.")
        if gate is not None:
            if perm13 is None:
                perm13 = torch.arange(hidden, dtype=torch.int32,
                                      device=moe.w13.device).repeat(num_experts, 1)
            perm13[e] = gate.to(perm13.device)
            moe.w13.data[e] = _sorted_inputs(moe.w13.data[e], gate)
        if down is not None:
            moe.w2.data[e] = _sorted_inputs(moe.w2.data[e], down)
            rows = torch.cat([down, down + local]).long().to(moe.w13.device)
            for t in (moe.w13, moe.w13_scale, moe.w13_zeros):
                t.data[e] = t.data[e][rows]
    if perm13 is not None:
        moe.w13_perm = perm13
        moe.act_order_loaded()


def _sorted_inputs(codes: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Packed rows ``[N, K/8]`` with their K inputs taken in the order ``perm``."""
    q = unpack_int4(codes.t())  # [K, N]
    return pack_int4(q[perm.long().to(q.device)]).t()


def init_dummy(moe, generator: torch.Generator, scale: float) -> None:
    """Random experts (``load_format="dummy"``): uniform values quantized round-to-nearest."""
    for e in range(moe.w13.shape[0]):
        for name in ("w13", "w2"):
            codes = getattr(moe, name).data[e]
            n, k = codes.shape[0], codes.shape[1] * 8
            w = torch.empty(n, k, device=codes.device).uniform_(-scale, scale,
                                                                generator=generator)
            q, s, z = quantize_int4(w, k // getattr(moe, f"{name}_scale").shape[2])
            codes.copy_(pack_int4(q).t())
            getattr(moe, f"{name}_scale").data[e].copy_(s.t())
            getattr(moe, f"{name}_zeros").data[e].copy_(z.t())
    moe.awaiting_scale.clear()
