"""Checked plugin calls: what a plugin's attention kernel and fused ops return, on first use.

The registry hands out a plugin's kernel and ops wrapped here. For the first steps of each
model load (and on every call under ``TESSELLM_VALIDATE_PLUGINS=1``) each call's result is
checked: shape, dtype and device, and a few rows against the pure-torch reference (a same-numel
wrong layout passes every shape check but not this). A mismatch raises one ``PluginError``
naming the plugin, the hook, what was expected and what came back.

Invariant: after the checked calls, the wrapper stores the plugin's own bound methods on itself
(``self.forward = kernel.forward``), so later calls run the plugin directly: no branch, no
check, no extra frame. Anything the wrapper does not define (``name``, ``kv_cache_dtypes``,
``linear`` ...) is read from the plugin's object.

Numeric probes need a host sync, so they are skipped while a CUDA graph is being captured and
on XLA devices (shape, dtype and device are still checked there).

The engine's kernel warm-up (before a server says ready) runs synthetic requests through the
checked calls, and they are checked; then ``restart()`` (``BackendRegistry.restart_checks``)
checks the next calls again as if none had run, so the warm-up does not use up the checks meant
for the first real requests.
"""

from __future__ import annotations

from typing import Optional

import torch

from tessellm import envs
from tessellm.backends.plugin_checks import PluginError
from tessellm.backends.reference.attention import softcap, softmax_with_sinks
from tessellm.backends.reference.lora import ReferenceLoRAOps
from tessellm.backends.reference.ops import ReferenceOps

# Attention: the kernel is checked until CHECKED_STEPS steps had their forwards probed against
# the reference (steps of requests with rows to probe: ``_probe_plan``), or UNPROBED_STEPS eager
# steps passed without a probe (decodes; a device the probe cannot sync), whichever comes first.
# The memory profile's step (its rows share cache slots) is never probed, graph capture's steps
# (no host copies) count toward neither: counted by calls, they used up the checks (one per
# captured size) before the first request's step.
CHECKED_STEPS = 2
UNPROBED_STEPS = 64
CHECKED_OP_CALLS = 8  # fused ops: calls of each op that are checked
PROBE_ROWS = 4  # rows compared against the reference
_REFERENCE = ReferenceOps()
_REFERENCE_LORA = ReferenceLoRAOps()


class Checked:
    """The base of the wrappers: ``_METHODS``, the methods it checks (a subclass's), which
    ``_uncheck`` replaces by the plugin's own and ``restart`` gives back; ``_start`` sets the
    counts of checked calls."""

    _METHODS: tuple[str, ...] = ()

    def __init__(self, inner, plugin: str, backend: str, hook: str, always: bool):
        self._inner = inner
        self._where = f"Backend plugin {plugin!r} ({hook} for backend {backend!r})"
        self._always = always
        self._start()

    def _start(self) -> None:
        pass

    def restart(self) -> None:
        """Check the next calls again, as if none had run (the warm-up ended)."""
        for method in self._METHODS:
            self.__dict__.pop(method, None)  # the plugin's bound method _uncheck put there
        self._start()

    def __getattr__(self, name):  # only for names the wrapper itself does not have
        inner = self.__dict__.get("_inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def _uncheck(self, *methods: str) -> None:
        if not self._always:
            for method in methods:
                setattr(self, method, getattr(self._inner, method))

    def _fail(self, call: str, expected: str, got: str):
        raise PluginError(f"{self._where}: {call} returned {got}; expected {expected}.")

    def _tensor(self, call: str, out, shape, dtype, device) -> None:
        if not isinstance(out, torch.Tensor):
            self._fail(call, "a torch.Tensor", type(out).__name__)
        want = [tuple(s) for s in (shape if isinstance(shape, list) else [shape])]
        if tuple(out.shape) not in want:
            self._fail(call, f"shape {' or '.join(map(str, want))}", f"shape {tuple(out.shape)}")
        if out.dtype != dtype:
            self._fail(call, f"dtype {dtype}", f"dtype {out.dtype}")
        if out.device != device:
            self._fail(call, f"device {device}", f"device {out.device}")

    def _close(self, call: str, got: torch.Tensor, ref: torch.Tensor, rel: float, hint: str):
        got, ref = got.float(), ref.float()
        tol = rel * float(ref.abs().max()) + rel * 0.1
        diff = float((got - ref).abs().max())
        if not diff <= tol:  # NaN fails too
            self._fail(call, f"the reference values on its first {ref.shape[0]} rows (max "
                             f"difference {tol:.3g})", f"values off by {diff:.3g}{hint}")


def _rel(dtype: torch.dtype) -> float:
    return 1e-3 if dtype == torch.float32 else (3e-2 if dtype == torch.bfloat16 else 1e-2)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _probing(t: torch.Tensor) -> bool:
    if t.device.type == "xla":
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


class CheckedAttentionKernel(Checked):
    """An ``AttentionKernel`` whose first steps' ``forward`` results are checked."""

    # The protocol's data members as properties, so that ``isinstance(wrapper, AttentionKernel)``
    # holds on Python 3.12+, whose runtime protocol checks look members up statically
    # (``inspect.getattr_static``) and never reach ``__getattr__``.
    name = property(lambda self: self._inner.name)
    supports_sliding_window = property(lambda self: self._inner.supports_sliding_window)

    _METHODS = ("build_metadata", "forward")

    def __init__(self, kernel, plugin: str, backend: str, spec, always: bool):
        self._spec = spec
        super().__init__(kernel, plugin, backend, "tessellm_attention_kernel", always)

    def _start(self) -> None:
        self._probed = 0  # steps whose forwards were probed (CHECKED_STEPS)
        self._unprobed = 0  # eager steps with nothing to probe (UNPROBED_STEPS)
        self._batch = None  # (this step's metadata, its probe plan or None)

    def build_metadata(self, batch):
        if _compiling():  # traced by torch.compile: the plugin's code only, no Python state
            return self._inner.build_metadata(batch)
        if not self._always and (self._probed >= CHECKED_STEPS or self._unprobed >= UNPROBED_STEPS):
            self._uncheck("build_metadata", "forward")
            self._batch = None
            return self._inner.build_metadata(batch)
        metadata = self._inner.build_metadata(batch)
        plan = _probe_plan(batch)
        if plan is not None:
            self._probed += 1
        elif batch.seq_lens_host:
            self._unprobed += 1
        # Probe only a forward given this very metadata: not a compiled step's, not a stale one.
        self._batch = (metadata, plan)
        return metadata

    def forward(self, q, k, v, k_cache, v_cache, metadata, scale, **kwargs):
        if _compiling():
            return self._inner.forward(q, k, v, k_cache, v_cache, metadata, scale, **kwargs)
        plan = self._batch[1] if self._batch is not None and self._batch[0] is metadata else None
        probe = _attention_probe(plan, q, k, v) if plan is not None else None
        out = self._inner.forward(q, k, v, k_cache, v_cache, metadata, scale, **kwargs)
        sinks = kwargs.get("sinks")
        rotary = {key: val for key, val in kwargs.items() if key != "sinks"}
        t, h, d = q.shape
        dv = getattr(self._spec, "mla_value_size", None) or d  # MLA: values are k's first dv
        self._tensor("forward", out, [(t, h, dv), (t, h * dv)], q.dtype, q.device)
        if probe is not None:
            first, rows, limits = probe
            if rotary:  # ``fuses_rotary``: the rows came unrotated; the reference rotates them
                rows = _rotated(rows, rotary["positions"][first:first + rows[0].shape[0]],
                                rotary["cos_sin_cache"])
            if rows[2] is None:
                rows = (rows[0], rows[1], rows[1][..., :dv])
            ref = _reference_attention(*rows, scale, self._spec.sliding_window,
                                       getattr(self._spec, "logit_softcap", None), sinks, limits)
            rel = 0.15 if self._spec.kv_cache_dtype != "auto" else _rel(q.dtype)
            got = out.reshape(t, h, dv)[first:first + ref.shape[0]]
            self._close("forward", got, ref, rel, " (is the output laid out [num_tokens, "
                                                  "num_heads, head_size]?)")
        return out


def _probe_plan(batch):
    """``(first row, number of rows, their key limits or None)``: the rows of this step to probe,
    those of a sequence with no cached context; None when it has none or cannot be probed (a
    graph step: no host copies; a device the probe cannot sync). With ``key_limits`` the rows
    stop before the first whose limit lies past them (the probe holds only its own rows' keys).
    Only rows whose keys the cache keeps (``_own_slots``)."""
    if batch is None or not batch.seq_lens_host or not _probing(batch.slot_mapping):
        return None
    starts, lens = batch.query_start_loc_host, batch.seq_lens_host
    limits = getattr(batch, "key_limits_host", None)
    for s in range(batch.num_seqs):
        n = starts[s + 1] - starts[s]
        if n >= 1 and lens[s] == n:
            a, r = starts[s], min(PROBE_ROWS, n)
            lim = None
            if limits is not None:
                lim = limits[a:a + r]
                while any(x >= r for x in lim[:r]):
                    r = next(i for i, x in enumerate(lim) if x >= r)
                lim = lim[:r]
            if r == 0 or not _own_slots(batch.slot_mapping, a, r):
                continue
            return a, r, lim
    return None


def _attention_probe(plan, q, k, v):
    """``(first row, (q, k, v) rows, their key limits)`` of ``plan``, copied before the kernel
    may change them in place; None where this forward cannot be probed (a graph capture)."""
    if not _probing(q):
        return None
    a, r, lim = plan
    return a, tuple(None if x is None else x[a:a + r].detach().clone() for x in (q, k, v)), lim


def _own_slots(slot_mapping: torch.Tensor, a: int, r: int) -> bool:
    """Whether rows ``a .. a + r - 1`` write their k/v to cache slots of their own: each a
    real slot (not -1), and no other row of the step writes it. The kernel reads the rows'
    keys back from the cache, the reference takes them from the rows; where another row
    writes the same slot the cache holds that row's key and the two differ by design. The
    memory profile's step is such a step (``RunnerProfile.profile_run``: every block-table
    entry is block 0, so token t of every sequence goes to slot t % block_size; its prompts
    are all token 0). There, probed, a right kernel failed on the GPU wherever the output
    depends on which key a slot holds: a Mamba layer before the attention (rows at other
    positions differ), attention sinks (the weights of equal values no longer sum to 1).
    Two host syncs, in checked steps only."""
    mine = slot_mapping[a:a + r]
    host = mine.tolist()
    if min(host) < 0 or len(set(host)) != r:
        return False
    others = torch.cat([slot_mapping[:a], slot_mapping[a + r:]])
    return not bool(torch.isin(others, mine).any())


def _rotated(rows, positions, cos_sin_cache):
    """Probe rows ``(q, k, v)`` with q and k NeoX-rotated by the reference, as a kernel that
    ``fuses_rotary`` must rotate them (``AttentionKernel.forward``)."""
    q, k, v = rows
    (r, h, d), kvh = q.shape, k.shape[1]
    q, k = _REFERENCE.rotary_embedding(positions, q.reshape(r, h * d).clone(),
                                       k.reshape(r, kvh * d).clone(), cos_sin_cache, d)
    return q.reshape(r, h, d), k.reshape(r, kvh, d), v


def _reference_attention(q, k, v, scale: float, window: Optional[int],
                         logit_softcap: Optional[float] = None,
                         sinks: Optional[torch.Tensor] = None,
                         key_limits: Optional[list] = None) -> torch.Tensor:
    """Causal attention of ``r`` rows over themselves: q ``[r, H, D]``, k/v ``[r, KVH, D]``;
    ``sinks`` ``[H]``: attention sinks (``softmax_with_sinks``); ``key_limits``: the last
    key each row sees (< r), None: its own."""
    r, h, _ = q.shape
    group = h // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = softcap(torch.einsum("ihd,jhd->hij", q.float(), k) * scale, logit_softcap)
    i = torch.arange(r, device=q.device)[:, None]
    j = torch.arange(r, device=q.device)[None, :]
    limit = i if key_limits is None else torch.tensor(key_limits, device=q.device)[:, None]
    visible = (j <= limit) & ((j > i - window) if window else True)
    probs = softmax_with_sinks(scores.masked_fill(~visible, float("-inf")),
                               None if sinks is None else sinks.view(-1, 1, 1).to(q.device))
    return torch.einsum("hij,jhd->ihd", probs, v)


class CheckedFusedOps(Checked):
    """``FusedOps`` whose first calls of each op are checked against ``ReferenceOps``."""

    _OPS = ("rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul")
    _METHODS = (*_OPS, "gated_rms_norm")

    def __init__(self, ops, plugin: str, backend: str, always: bool):
        super().__init__(ops, plugin, backend, "tessellm_fused_ops", always)

    def _start(self) -> None:
        self._calls = dict.fromkeys(self._OPS, 0)
        if callable(getattr(self._inner, "gated_rms_norm", None)):  # optional (plugin API 19)
            self._calls["gated_rms_norm"] = 0
            self.gated_rms_norm = self._checked_gated_rms_norm

    def _tick_optional(self, op: str) -> None:
        self._calls[op] += 1
        if self._calls[op] >= CHECKED_OP_CALLS and not self._always:
            setattr(self, op, getattr(self._inner, op))

    def _checked_gated_rms_norm(self, y, z, weight, group_size, eps, mode="gate_then_norm"):
        """The plugin's gated RMSNorm: its result's shape, dtype and device, and its first rows
        against ``reference/gated_norm.py`` (each row's output depends on that row alone)."""
        from tessellm.backends.reference.gated_norm import gated_rms_norm

        if _compiling():
            return self._inner.gated_rms_norm(y, z, weight, group_size, eps, mode)
        rows = _rows(y)
        z_rows = None if rows is None else z[:PROBE_ROWS].detach().clone()
        out = self._inner.gated_rms_norm(y, z, weight, group_size, eps, mode)
        self._tensor("gated_rms_norm", out, y.shape, y.dtype, y.device)
        if rows is not None:
            want = gated_rms_norm(rows, z_rows, weight, group_size, eps, mode)
            self._close("gated_rms_norm", out[:len(rows)], want, _rel(y.dtype), f" ({mode})")
        self._tick_optional("gated_rms_norm")
        return out

    def _tick(self, op: str) -> None:
        self._calls[op] += 1
        if self._calls[op] >= CHECKED_OP_CALLS:
            self._uncheck(op)

    def rms_norm(self, x, weight, eps):
        if _compiling():
            return self._inner.rms_norm(x, weight, eps)
        rows = _rows(x)
        out = self._inner.rms_norm(x, weight, eps)
        self._tensor("rms_norm", out, x.shape, x.dtype, x.device)
        if rows is not None:
            self._close("rms_norm", out[:len(rows)], _REFERENCE.rms_norm(rows, weight, eps),
                        _rel(x.dtype), "")
        self._tick("rms_norm")
        return out

    def fused_add_rms_norm(self, x, residual, weight, eps):
        if _compiling():
            return self._inner.fused_add_rms_norm(x, residual, weight, eps)
        rows, res_rows = _rows(x), _rows(residual)
        shape, dtype, device = x.shape, x.dtype, x.device
        out = self._inner.fused_add_rms_norm(x, residual, weight, eps)
        if not (isinstance(out, tuple) and len(out) == 2):
            self._fail("fused_add_rms_norm", "a tuple (normed, residual)", type(out).__name__)
        for got in out:
            self._tensor("fused_add_rms_norm", got, shape, dtype, device)
        if rows is not None:
            ref = _REFERENCE.fused_add_rms_norm(rows, res_rows, weight, eps)
            for got, want in zip(out, ref):
                self._close("fused_add_rms_norm", got[:len(rows)], want, _rel(dtype), "")
        self._tick("fused_add_rms_norm")
        return out

    def rotary_embedding(self, positions, q, k, cos_sin_cache, head_size):
        if _compiling():
            return self._inner.rotary_embedding(positions, q, k, cos_sin_cache, head_size)
        rows = None if _rows(q) is None else (positions[:PROBE_ROWS], _rows(q), _rows(k))
        shapes = (q.shape, k.shape)
        out = self._inner.rotary_embedding(positions, q, k, cos_sin_cache, head_size)
        if not (isinstance(out, tuple) and len(out) == 2):
            self._fail("rotary_embedding", "a tuple (q, k)", type(out).__name__)
        for got, shape in zip(out, shapes):
            self._tensor("rotary_embedding", got, shape, q.dtype, q.device)
        if rows is not None:
            ref = _REFERENCE.rotary_embedding(*rows, cos_sin_cache, head_size)
            for got, want in zip(out, ref):
                self._close("rotary_embedding", got[:len(want)], want, _rel(q.dtype), "")
        self._tick("rotary_embedding")
        return out

    def silu_and_mul(self, x):
        if _compiling():
            return self._inner.silu_and_mul(x)
        rows = _rows(x)
        out = self._inner.silu_and_mul(x)
        self._tensor("silu_and_mul", out, (*x.shape[:-1], x.shape[-1] // 2), x.dtype, x.device)
        if rows is not None:
            self._close("silu_and_mul", out[:len(rows)], _REFERENCE.silu_and_mul(rows),
                        _rel(x.dtype), "")
        self._tick("silu_and_mul")
        return out


class CheckedLoRAOps(Checked):
    """``LoRAOps`` whose first shrink/expand calls are checked against ``ReferenceLoRAOps`` on
    their first rows (the slots of those rows come from the ``prepare`` that made ``meta``)."""

    name = property(lambda self: self._inner.name)
    supports_graph_capture = property(
        lambda self: getattr(self._inner, "supports_graph_capture", False))

    _METHODS = ("prepare", "shrink", "expand", "expand_slices", "fused_experts_lora")

    def __init__(self, ops, plugin: str, backend: str, always: bool):
        super().__init__(ops, plugin, backend, "tessellm_lora_ops", always)

    def _start(self) -> None:
        self._calls = {"shrink": 0, "expand": 0}
        self._step = None  # (the plugin's meta, the reference meta of its first rows)
        self._moe_calls = 0
        if callable(getattr(self._inner, "fused_experts_lora", None)):  # optional (plugin API 14)
            self.fused_experts_lora = self._checked_fused_experts_lora

    def _checked_fused_experts_lora(self, hidden, topk_weights, topk_ids, w13, w2, token_slots,
                                    lora, **variant):
        """The plugin's MoE experts with LoRA: its result's shape, dtype and device, and its
        first tokens against the reference on the same tokens (each token's output depends on
        that token alone), for the first calls."""
        from tessellm.backends.reference.moe_lora import fused_experts_lora_reference

        probe = not _compiling() and _probing(token_slots)
        got = self._inner.fused_experts_lora(hidden, topk_weights, topk_ids, w13, w2,
                                             token_slots, lora, **variant)
        self._tensor("fused_experts_lora", got, tuple(hidden.shape), hidden.dtype, hidden.device)
        if probe:
            n = PROBE_ROWS
            want = fused_experts_lora_reference(hidden[:n], topk_weights[:n], topk_ids[:n], w13,
                                                w2, token_slots[:n], lora, **variant)
            self._close("fused_experts_lora", got[:n], want, _rel(hidden.dtype),
                        " (each routed expert's products plus its token's adapter, ExpertLoRA)")
        self._moe_calls += 1
        if self._moe_calls >= CHECKED_OP_CALLS and not self._always:
            self.fused_experts_lora = self._inner.fused_experts_lora
        return got

    def prepare(self, token_slots, num_slots):
        meta = self._inner.prepare(token_slots, num_slots)
        self._step = None
        if _probing(token_slots) and not _compiling():
            head = token_slots[:PROBE_ROWS]
            self._step = (meta, _REFERENCE_LORA.prepare(head, num_slots))
        return meta

    def _probe_meta(self, meta):
        step = self._step
        return step[1] if step is not None and step[0] is meta else None

    def _tick(self, op: str) -> None:
        self._calls[op] += 1
        if all(n >= CHECKED_OP_CALLS for n in self._calls.values()):
            self._uncheck("prepare", "shrink", "expand", "expand_slices")

    def shrink(self, x, lora_a, meta, out):
        ref_meta = None if _compiling() else self._probe_meta(meta)
        rows = None if ref_meta is None else x[:PROBE_ROWS].detach().clone()
        shape, dtype = tuple(out.shape), out.dtype
        got = self._inner.shrink(x, lora_a, meta, out)
        if got is not None:
            self._fail("shrink", "None (it writes out in place)", type(got).__name__)
        self._tensor("shrink's out", out, shape, dtype, x.device)
        if rows is not None:
            want = torch.empty(len(rows), shape[1], dtype=dtype, device=out.device)
            _REFERENCE_LORA.shrink(rows, lora_a, ref_meta, want)
            self._close("shrink", out[:len(rows)], want, _rel(x.dtype),
                        " (out[t] = lora_a[slot[t]] @ x[t], 0 for slot -1)")
        self._tick("shrink")

    def expand(self, buf, lora_b, meta, scaling, out, out_offset=0):
        self._checked_add("expand", buf, meta, out,
                          lambda ops, b, m, o: ops.expand(b, lora_b, m, scaling, o, out_offset),
                          " (out[t, off:off+N] += scaling[s] * lora_b[s] @ buf[t], s = slot[t])")

    def expand_slices(self, buf, lora_bs, meta, scaling, out, offsets):
        self._checked_add("expand_slices", buf, meta, out,
                          lambda ops, b, m, o: ops.expand_slices(b, lora_bs, m, scaling, o, offsets),
                          " (slice i reads buf[:, i*R:(i+1)*R] and adds at offsets[i])")

    def _checked_add(self, op: str, buf, meta, out, call, hint: str) -> None:
        """``call(ops, buf, meta, out)`` adds into ``out`` in place: the plugin's call, checked
        for its return value, ``out``'s shape and dtype, and its first rows against the
        reference's on the same rows."""
        ref_meta = None if _compiling() else self._probe_meta(meta)
        want = None
        if ref_meta is not None:
            want = out[:PROBE_ROWS].detach().clone()
            call(_REFERENCE_LORA, buf[:PROBE_ROWS], ref_meta, want)
        shape, dtype = tuple(out.shape), out.dtype
        got = call(self._inner, buf, meta, out)
        if got is not None:
            self._fail(op, "None (it adds into out in place)", type(got).__name__)
        self._tensor(f"{op}'s out", out, shape, dtype, buf.device)
        if want is not None:
            self._close(op, out[:len(want)], want, _rel(out.dtype), hint)
        self._tick("expand")


def _rows(x: torch.Tensor) -> Optional[torch.Tensor]:
    """A copy of x's first rows for a reference check (None when probing is off here)."""
    if x.dim() < 2 or x.shape[0] == 0 or not _probing(x):
        return None
    return x[:PROBE_ROWS].detach().clone()


def _unwrapped() -> bool:
    """TESSELLM_CPU_COMPILE=1 traces the decode step with torch.compile once, at capture; the
    wrapper stepping aside later would change what it traced and recompile it, so with it on
    (and no TESSELLM_VALIDATE_PLUGINS) the pieces are handed out unchecked."""
    return envs.cpu_compile() is True and not envs.validate_plugins()


def checked_kernel(kernel, plugin: str, backend: str, spec):
    if _unwrapped():
        return kernel
    return CheckedAttentionKernel(kernel, plugin, backend, spec, envs.validate_plugins())


def checked_ops(ops, plugin: str, backend: str):
    if _unwrapped():
        return ops
    return CheckedFusedOps(ops, plugin, backend, envs.validate_plugins())


def checked_lora_ops(ops, plugin: str, backend: str):
    if _unwrapped():
        return ops
    return CheckedLoRAOps(ops, plugin, backend, envs.validate_plugins())
