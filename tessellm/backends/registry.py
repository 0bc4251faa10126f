"""Plugin manager, entry-point discovery, validation and device selection.

Plugins load once per process through the ``tessellm.backends`` entry-point group (in-tree
backends included, exactly like third-party ones). ``TESSELLM_PLUGINS`` (comma-separated
entry-point names) limits which load. Every failure names the plugin and the fix:

- a plugin module that fails to import, or needs a newer ``TESSELLM_PLUGIN_API``;
- a hook that does not match its spec (unknown hook name, unknown argument, a ``tessellm_*``
  function without ``@hookimpl``, a hook wrapper);
- a hook that raises, or returns an object that lacks a member of the protocol;
- two plugins registering the same backend name, or ``--device=auto`` with a priority tie;
- a hook answering for a backend another plugin owns without declaring ``TESSELLM_OVERRIDES``.

Isolation: a plugin discovered through an entry point that fails to load (import error, API
version, hook mismatch, a raising or duplicate ``tessellm_register_backends``) is disabled on
its own: one warning line, its backends absent, ``--device`` naming it gets one sentence saying
why, every other backend works. Plugins passed in ``plugins=`` (tests, embedding applications)
fail loudly instead.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import weakref
from dataclasses import dataclass, replace
from typing import Iterable, Optional

import pluggy

from tessellm import envs
from tessellm.backends import spec
from tessellm.backends.checked import Checked, checked_kernel, checked_lora_ops, checked_ops
from tessellm.backends.plugin_checks import (PluginError, api_required, check_backend,
                                             check_hook_names, check_no_wrappers, one_line,
                                             overrides, protocol_members, renamed)
from tessellm.backends.spec import Backend

logger = logging.getLogger(__name__)

__all__ = ["BackendRegistry", "DeviceError", "PluginError", "PluginInfo", "get_registry"]


class DeviceError(ValueError):
    """The requested device is unknown or not available here."""


@dataclass(frozen=True)
class PluginInfo:
    name: str  # entry-point name (what TESSELLM_PLUGINS lists)
    module: str  # the plugin module (or object) registered with pluggy
    api_required: int  # its TESSELLM_PLUGIN_API_REQUIRED
    distribution: str = ""  # the installed package that declared the entry point, if any
    version: str = ""  # that package's version
    overrides: tuple[str, ...] = ()  # TESSELLM_OVERRIDES: others' backends it may answer for


class BackendRegistry:
    """The loaded plugins and the backends they registered.

    ``allowed``: entry-point names to load (None: all). ``plugins``: extra ``(name, module)``
    pairs registered after the entry points (tests, embedding applications).
    """

    def __init__(self, allowed: Optional[set[str]] = None, load_entry_points: bool = True,
                 plugins: Iterable[tuple[str, object]] = ()):
        self.pm = pluggy.PluginManager(spec.PROJECT_NAME)
        self.pm.add_hookspecs(spec.BackendHookSpec)
        self.plugins: dict[str, PluginInfo] = {}
        self.backends: dict[str, Backend] = {}
        # Plugins disabled at load (entry points only): name -> the one-sentence reason.
        self.broken: dict[str, str] = {}
        self._isolated: set[str] = set()  # plugins loaded from entry points
        self._backend_names: dict[str, set[str]] = {}  # plugin -> names it tried to register
        self._checked: weakref.WeakSet = weakref.WeakSet()  # checked wrappers handed out, alive
        self.allowed = allowed
        if load_entry_points:
            self._load_entry_points(allowed)
        for name, module in plugins:
            self._register(module, name)
        self.pm.check_pending()  # every plugin is already validated; this is the last guard
        self.collect_backends()

    # -- loading ---------------------------------------------------------------------------

    def _load_entry_points(self, allowed: Optional[set[str]]) -> None:
        eps = list(importlib.metadata.entry_points(group=spec.ENTRY_POINT_GROUP))
        if allowed is not None:
            unknown = sorted(allowed - {ep.name for ep in eps})
            if unknown:
                raise PluginError(
                    f"TESSELLM_PLUGINS names {', '.join(map(repr, unknown))}, which no installed "
                    f"package provides; installed backend plugins: "
                    f"{', '.join(sorted({ep.name for ep in eps})) or 'none'}.")
        seen: dict[str, str] = {}
        eps.sort(key=lambda ep: not ep.value.startswith("tessellm.backends."))  # ours first
        for ep in eps:
            if allowed is not None and ep.name not in allowed:
                continue
            if ep.name in seen:
                if seen[ep.name] != ep.value:  # the same package seen twice is harmless
                    reason = (f"Two installed packages declare backend plugin {ep.name!r}: "
                              f"{seen[ep.name]} and {ep.value}; uninstall one.")
                    if seen[ep.name].startswith("tessellm.backends."):  # keep tessellm's own
                        self._disable(f"{ep.name} ({ep.value})", reason)
                    else:
                        self._disable(ep.name, reason)
                continue
            seen[ep.name] = ep.value
            try:
                self._load_entry_point(ep)
            except PluginError as exc:
                self._disable(ep.name, str(exc))
            else:
                self._isolated.add(ep.name)

    def _disable(self, name: str, reason: str) -> None:
        """Take a broken entry-point plugin out (hooks and backends); warn once, one line."""
        reason = one_line(reason)
        if name in self.broken:
            return
        if self.pm.get_plugin(name) is not None:
            self.pm.unregister(name=name)
        self.plugins.pop(name, None)
        self._isolated.discard(name)
        for backend in [b for b in self.backends.values() if b.plugin_name == name]:
            del self.backends[backend.name]
        self.broken[name] = reason
        logger.warning("%s Plugin %r is disabled; the other backends work.",
                       reason if reason.endswith(".") else reason + ".", name)

    def _load_entry_point(self, ep) -> None:
        dist = getattr(ep, "dist", None)
        where = f"{ep.value}" + (f" from package {dist.name} {dist.version}" if dist else "")
        try:
            module = ep.load()
        except Exception as exc:  # noqa: BLE001 - re-raised with the plugin's name
            raise PluginError(f"Backend plugin {ep.name!r} ({where}) failed to import: "
                              f"{type(exc).__name__}: {exc}. Fix or uninstall it, or leave it "
                              "out with TESSELLM_PLUGINS.") from exc
        self._register(module, ep.name, dist.name if dist else "", dist.version if dist else "")

    def register_plugin(self, module, name: str) -> None:
        """Register a plugin object (module or instance) under ``name``, validate it, and
        re-collect backends. Raises ``PluginError`` naming the plugin when it does not match."""
        self._register(module, name)
        self.collect_backends()

    def _register(self, module, name: str, distribution: str = "", version: str = "") -> None:
        if name in self.plugins:
            raise PluginError(f"A backend plugin named {name!r} is already registered "
                              f"({self.plugins[name].module}).")
        required = api_required(module, name)
        check_hook_names(module, name)
        declared = overrides(module, name)
        try:
            self.pm.register(module, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"Backend plugin {name!r} does not match the tessellm hook "
                              f"specification: {one_line(exc)}") from exc
        try:
            self.pm.check_pending()
            check_no_wrappers(self.pm, name)
        except (pluggy.PluginValidationError, PluginError) as exc:
            self.pm.unregister(name=name)
            if isinstance(exc, PluginError):
                raise
            raise PluginError(f"Backend plugin {name!r} does not match the tessellm hook "
                              f"specification: {one_line(exc)}") from exc
        self.plugins[name] = PluginInfo(name, getattr(module, "__name__", repr(module)), required,
                                        distribution, version, declared)

    def collect_backends(self) -> None:
        """Ask every plugin to register its backends (again), validating each one. A failing
        entry-point plugin is disabled (``_disable``); any other failure raises."""
        self.backends.clear()
        impls = self.pm.hook.tessellm_register_backends.get_hookimpls()  # load order
        # tessellm's own plugins first, so a third-party duplicate of "cpu" is the one disabled.
        impls.sort(key=lambda impl: not self._in_tree(impl.plugin_name))
        for impl in impls:
            try:
                self._collect_from(impl)
            except PluginError as exc:
                if impl.plugin_name not in self._isolated:
                    raise
                self._disable(impl.plugin_name, str(exc))

    def _in_tree(self, plugin: str) -> bool:
        info = self.plugins.get(plugin)
        return info is not None and info.module.startswith("tessellm.backends.")

    def _collect_from(self, impl) -> None:
        plugin_name = impl.plugin_name
        mine: list[Backend] = []
        names = self._backend_names.setdefault(plugin_name, set())

        def register(backend: Backend) -> None:
            check_backend(backend, plugin_name)
            names.add(backend.name)
            other = self.backends.get(backend.name)
            if other is not None:
                raise PluginError(f"Backend {backend.name!r} is registered by both "
                                  f"{other.plugin_name!r} and {plugin_name!r}; uninstall one or "
                                  "limit plugins with TESSELLM_PLUGINS.")
            mine.append(replace(backend, plugin_name=plugin_name))

        try:
            impl.function(**_hook_kwargs(impl, register=register))
        except PluginError:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised with the plugin's name
            raise PluginError(f"Backend plugin {plugin_name!r} raised in "
                              f"tessellm_register_backends: {type(exc).__name__}: {exc}") from exc
        self.backends.update((b.name, b) for b in mine)  # all or nothing

    # -- selection -------------------------------------------------------------------------

    def available(self) -> list[Backend]:
        return [b for b in self.backends.values() if _safe_available(b)]

    def select(self, device: str = "auto", emulate: bool = False) -> Backend:
        """The backend for ``device``: a backend name, or "auto" for the best available one.
        ``emulate``: the named backend's kernels on host tensors, its device absent or not
        (``tessellm.backends.emulation``)."""
        if emulate:
            if device == "auto":
                raise DeviceError("emulate needs an explicit device (--device xpu --emulate): "
                                  "'auto' picks only among available backends.")
            if device not in self.backends:
                self.select(device)  # raises the unknown-device error
            from tessellm.backends.emulation import emulated_backend

            return emulated_backend(self.backends[device])
        if device != "auto":
            backend = self.backends.get(device)
            if backend is None:
                self._refuse_broken(device)
                raise DeviceError(f"Unknown device {device!r}. Known backends: "
                                  f"{', '.join(sorted(self.backends)) or 'none'}; a third-party "
                                  "one is installed with pip as a plugin (docs/plugins.md), and "
                                  "`tessellm backends` lists what is installed.")
            if not _safe_available(backend):
                raise DeviceError(f"Device {device!r} (plugin {backend.plugin_name!r}) is not "
                                  f"available on this machine. Available: "
                                  f"{', '.join(b.name for b in self.available()) or 'none'}; "
                                  "`tessellm backends` says why.")
            return backend
        candidates = sorted(self.available(), key=lambda b: -b.priority)
        if not candidates:
            raise DeviceError("No backend is available; the cpu backend ships with tessellm, so "
                              "check TESSELLM_PLUGINS.")
        top = sorted((b for b in candidates if b.priority == candidates[0].priority),
                     key=lambda b: b.name)
        if len(top) > 1:
            names = ", ".join(f"{b.name} ({b.plugin_name})" for b in top)
            raise DeviceError(f"--device=auto is ambiguous: {names} share priority "
                              f"{top[0].priority}; pass --device explicitly.")
        return top[0]

    def _refuse_broken(self, device: str) -> None:
        """``device`` belongs to a plugin that failed to load: say so, in one sentence."""
        for plugin, reason in self.broken.items():
            if device == plugin or device in self._backend_names.get(plugin, ()):
                raise DeviceError(f"Device {device!r} is unavailable because its backend plugin "
                                  f"{plugin!r} failed to load: {reason}")

    # -- pieces ----------------------------------------------------------------------------

    def provider(self, hook_name: str, backend: Backend, spec_obj) -> tuple[object, Optional[str]]:
        """Call a firstresult hook the way pluggy does (tryfirst first, then last-registered
        first) and return ``(result, plugin name)``; ``(None, None)`` when no plugin answers.

        ``hook_name``: a hook name or a piece name from ``spec.PIECES`` ("attention", ...).
        A ``ValueError``/``NotImplementedError`` from a plugin (an unsupported spec) propagates
        with the plugin's name prefixed; any other exception becomes a ``PluginError``.
        """
        hook_name = spec.PIECES.get(hook_name, hook_name)
        hook = getattr(self.pm.hook, hook_name)
        protocol = spec.HOOK_RESULT_PROTOCOLS[hook_name]
        for impl in reversed(hook.get_hookimpls()):  # pluggy's call order
            try:
                result = impl.function(**_hook_kwargs(impl, backend=backend, spec=spec_obj))
            except (ValueError, NotImplementedError) as exc:
                raise renamed(exc, f"[plugin {impl.plugin_name!r}, {hook_name}] {exc}") from exc
            except Exception as exc:  # noqa: BLE001 - re-raised with the plugin's name
                raise PluginError(f"Backend plugin {impl.plugin_name!r} raised in {hook_name} "
                                  f"for backend {backend.name!r}: {type(exc).__name__}: {exc}"
                                  ) from exc
            if result is None:
                continue
            if not isinstance(result, protocol):
                missing = [m for m in protocol_members(protocol) if not hasattr(result, m)]
                raise PluginError(f"Backend plugin {impl.plugin_name!r} returned "
                                  f"{type(result).__name__} from {hook_name}, which is not a "
                                  f"{protocol.__name__}: it lacks {', '.join(missing)}.")
            self._check_owner(impl.plugin_name, hook_name, backend)
            return result, impl.plugin_name
        return None, None

    def _check_owner(self, plugin: str, hook_name: str, backend: Backend) -> None:
        """Refuse an answer for a backend another plugin owns, unless the plugin declared it."""
        owner = backend.plugin_name
        info = self.plugins.get(plugin)
        if not owner or owner == plugin or info is None or backend.name in info.overrides:
            return
        raise PluginError(f"Backend plugin {plugin!r} answered {hook_name} for backend "
                          f"{backend.name!r}, which plugin {owner!r} owns; return None unless "
                          f"backend.name is yours, or declare the override with "
                          f"{spec.OVERRIDES_ATTR} = ({backend.name!r},) in its plugin module.")

    def overriders(self, backend_name: str) -> list[str]:
        """Plugins that declare ``TESSELLM_OVERRIDES`` for ``backend_name``."""
        return [p.name for p in self.plugins.values() if backend_name in p.overrides]

    def implementers(self, hook_name: str) -> list[str]:
        """Plugins implementing a hook, in call order (tryfirst ones first)."""
        hook = getattr(self.pm.hook, spec.PIECES.get(hook_name, hook_name))
        return [impl.plugin_name for impl in reversed(hook.get_hookimpls())]

    def attention_kernel(self, backend: Backend, attn_spec: spec.AttentionSpec):
        """The kernel for ``backend``, wrapped so its first steps are checked (checked.py)."""
        kernel, plugin = self.provider("tessellm_attention_kernel", backend, attn_spec)
        return None if kernel is None else self._kept(checked_kernel(kernel, plugin, backend.name, attn_spec))

    def fused_ops(self, backend: Backend, ops_spec: spec.OpsSpec):
        """The plugin's fused ops for ``backend`` (checked on first calls), or None."""
        ops, plugin = self.provider("tessellm_fused_ops", backend, ops_spec)
        return None if ops is None else self._kept(checked_ops(ops, plugin, backend.name))

    def lora_ops(self, backend: Backend, lora_spec: spec.LoRAOpsSpec):
        """The plugin's batched LoRA ops for ``backend`` (checked on first calls), or the
        pure-torch reference when no plugin answers."""
        ops, plugin = self.provider("tessellm_lora_ops", backend, lora_spec)
        if ops is None:
            from tessellm.backends.reference.lora import ReferenceLoRAOps

            return ReferenceLoRAOps()
        return self._kept(checked_lora_ops(ops, plugin, backend.name))

    def _kept(self, piece):
        """``piece`` as handed out, a checked wrapper kept (weakly) for ``restart_checks``."""
        if isinstance(piece, Checked):
            self._checked.add(piece)
        return piece

    def restart_checks(self) -> None:
        """Every checked kernel and op handed out in this process (and still in use) checks its
        next calls again, as if none had run: the engine's warm-up ended, and its synthetic
        requests must not use up the checks meant for the first real ones (checked.py)."""
        for piece in list(self._checked):
            piece.restart()

    def graph_runner(self, backend: Backend, graph_spec: spec.GraphSpec):
        return self.provider("tessellm_graph_runner", backend, graph_spec)[0]

    def quant_method(self, backend: Backend, quant_spec: spec.QuantSpec):
        return self.provider("tessellm_quant_method", backend, quant_spec)[0]


def _hook_kwargs(impl, **available):
    """Only the arguments the implementation declares (pluggy's 'fewer arguments' rule)."""
    return {name: available[name] for name in impl.argnames}


def _safe_available(backend: Backend) -> bool:
    try:
        return bool(backend.is_available())
    except Exception:  # noqa: BLE001 - an availability probe must never crash selection
        return False


@functools.lru_cache(maxsize=None)
def _registry_for(allowed: Optional[frozenset[str]]) -> BackendRegistry:
    return BackendRegistry(set(allowed) if allowed is not None else None)


def get_registry() -> BackendRegistry:
    """The process-wide registry (plugins load once per process), honouring TESSELLM_PLUGINS."""
    allowed = envs.plugins_allowed()
    return _registry_for(frozenset(allowed) if allowed is not None else None)
