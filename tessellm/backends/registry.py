"""Plugin manager, entry-point discovery, validation and device selection.

Plugins load once per process through the ``tessellm.backends`` entry-point group (in-tree
backends included, exactly like third-party ones). ``TESSELLM_PLUGINS`` (comma-separated
entry-point names) limits which load. Every failure names the plugin and the fix:

- a plugin module that fails to import, or needs a newer ``TESSELLM_PLUGIN_API``;
- a hook that does not match its spec (unknown hook name, unknown argument, a ``tessellm_*``
  function without ``@hookimpl``, a hook wrapper);
- a hook that raises, or returns an object that lacks a member of the protocol;
- two plugins registering the same backend name, or ``--device=auto`` with a priority tie.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
from dataclasses import dataclass, replace
from typing import Iterable, Optional

import pluggy

from tessellm import envs
from tessellm.backends import spec
from tessellm.backends.spec import Backend

_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]*$")


class PluginError(RuntimeError):
    """A plugin failed to load or does not match the contract."""


class DeviceError(ValueError):
    """The requested device is unknown or not available here."""


@dataclass(frozen=True)
class PluginInfo:
    name: str  # entry-point name (what TESSELLM_PLUGINS lists)
    module: str  # the plugin module (or object) registered with pluggy
    api_required: int  # its TESSELLM_PLUGIN_API_REQUIRED
    distribution: str = ""  # the installed package that declared the entry point, if any
    version: str = ""  # that package's version


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
        for ep in eps:
            if allowed is not None and ep.name not in allowed:
                continue
            if ep.name in seen:
                if seen[ep.name] != ep.value:  # the same package seen twice is harmless
                    raise PluginError(
                        f"Two installed packages declare backend plugin {ep.name!r}: "
                        f"{seen[ep.name]} and {ep.value}; uninstall one.")
                continue
            seen[ep.name] = ep.value
            self._load_entry_point(ep)

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
        required = _api_required(module, name)
        _check_hook_names(module, name)
        try:
            self.pm.register(module, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"Backend plugin {name!r} does not match the tessellm hook "
                              f"specification: {_one_line(exc)}") from exc
        try:
            self.pm.check_pending()
            _check_no_wrappers(self.pm, name)
        except (pluggy.PluginValidationError, PluginError) as exc:
            self.pm.unregister(name=name)
            if isinstance(exc, PluginError):
                raise
            raise PluginError(f"Backend plugin {name!r} does not match the tessellm hook "
                              f"specification: {_one_line(exc)}") from exc
        self.plugins[name] = PluginInfo(name, getattr(module, "__name__", repr(module)), required,
                                        distribution, version)

    def collect_backends(self) -> None:
        """Ask every plugin to register its backends (again), validating each one."""
        self.backends.clear()
        for impl in self.pm.hook.tessellm_register_backends.get_hookimpls():  # load order
            plugin_name = impl.plugin_name

            def register(backend: Backend, _plugin=plugin_name) -> None:
                _check_backend(backend, _plugin)
                other = self.backends.get(backend.name)
                if other is not None:
                    raise PluginError(f"Backend {backend.name!r} is registered by both "
                                      f"{other.plugin_name!r} and {_plugin!r}; uninstall one or "
                                      "limit plugins with TESSELLM_PLUGINS.")
                self.backends[backend.name] = replace(backend, plugin_name=_plugin)

            try:
                impl.function(**_hook_kwargs(impl, register=register))
            except PluginError:
                raise
            except Exception as exc:  # noqa: BLE001 - re-raised with the plugin's name
                raise PluginError(f"Backend plugin {plugin_name!r} raised in "
                                  f"tessellm_register_backends: {type(exc).__name__}: {exc}") from exc

    # -- selection -------------------------------------------------------------------------

    def available(self) -> list[Backend]:
        return [b for b in self.backends.values() if _safe_available(b)]

    def select(self, device: str = "auto") -> Backend:
        """The backend for ``device``: a backend name, or "auto" for the best available one."""
        if device != "auto":
            backend = self.backends.get(device)
            if backend is None:
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
                raise _renamed(exc, f"[plugin {impl.plugin_name!r}, {hook_name}] {exc}") from exc
            except Exception as exc:  # noqa: BLE001 - re-raised with the plugin's name
                raise PluginError(f"Backend plugin {impl.plugin_name!r} raised in {hook_name} "
                                  f"for backend {backend.name!r}: {type(exc).__name__}: {exc}"
                                  ) from exc
            if result is None:
                continue
            if not isinstance(result, protocol):
                missing = [m for m in _protocol_members(protocol) if not hasattr(result, m)]
                raise PluginError(f"Backend plugin {impl.plugin_name!r} returned "
                                  f"{type(result).__name__} from {hook_name}, which is not a "
                                  f"{protocol.__name__}: it lacks {', '.join(missing)}.")
            return result, impl.plugin_name
        return None, None

    def implementers(self, hook_name: str) -> list[str]:
        """Plugins implementing a hook, in call order (tryfirst ones first)."""
        hook = getattr(self.pm.hook, spec.PIECES.get(hook_name, hook_name))
        return [impl.plugin_name for impl in reversed(hook.get_hookimpls())]

    def attention_kernel(self, backend: Backend, attn_spec: spec.AttentionSpec):
        return self.provider("tessellm_attention_kernel", backend, attn_spec)[0]

    def fused_ops(self, backend: Backend, ops_spec: spec.OpsSpec):
        return self.provider("tessellm_fused_ops", backend, ops_spec)[0]

    def graph_runner(self, backend: Backend, graph_spec: spec.GraphSpec):
        return self.provider("tessellm_graph_runner", backend, graph_spec)[0]

    def quant_method(self, backend: Backend, quant_spec: spec.QuantSpec):
        return self.provider("tessellm_quant_method", backend, quant_spec)[0]


# ---------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------


def _api_required(module, name: str) -> int:
    required = getattr(module, spec.API_REQUIRED_ATTR, 1)
    if not isinstance(required, int) or isinstance(required, bool) or required < 1:
        raise PluginError(f"Backend plugin {name!r} sets {spec.API_REQUIRED_ATTR} = "
                          f"{required!r}; it must be a positive integer.")
    if required > spec.TESSELLM_PLUGIN_API:
        raise PluginError(
            f"Backend plugin {name!r} needs tessellm plugin API {required}, but this tessellm "
            f"provides API {spec.TESSELLM_PLUGIN_API}; upgrade tessellm or use an older plugin.")
    return required


def _check_hook_names(module, name: str) -> None:
    """A ``tessellm_*`` callable not marked ``@hookimpl`` would be ignored silently by pluggy."""
    marker = f"{spec.PROJECT_NAME}_impl"
    for attr in dir(module):
        if not attr.startswith("tessellm_"):
            continue
        value = getattr(module, attr, None)
        if callable(value) and not hasattr(value, marker):
            raise PluginError(f"Backend plugin {name!r} defines {attr} without @hookimpl, so "
                              "tessellm would never call it; decorate it with "
                              "tessellm.backends.spec.hookimpl.")


def _check_no_wrappers(pm: pluggy.PluginManager, name: str) -> None:
    plugin = pm.get_plugin(name)
    for caller in pm.get_hookcallers(plugin) or []:
        for impl in caller.get_hookimpls():
            if impl.plugin_name == name and (impl.hookwrapper or getattr(impl, "wrapper", False)):
                raise PluginError(f"Backend plugin {name!r} implements {caller.name} as a "
                                  "wrapper; tessellm hooks take plain implementations (use "
                                  "tryfirst=True to override another plugin).")


def _check_backend(backend, plugin: str) -> None:
    if not isinstance(backend, Backend):
        raise PluginError(f"Backend plugin {plugin!r} registered {backend!r}, which is not a "
                          "tessellm.backends.spec.Backend.")
    problems = []
    if not isinstance(backend.name, str) or not _NAME_RE.match(backend.name) or backend.name == "auto":
        problems.append(f"name {backend.name!r} must be lower-case letters, digits, '-' or '_' "
                        "(and not 'auto')")
    if not isinstance(backend.priority, int):
        problems.append(f"priority {backend.priority!r} must be an int")
    if not callable(backend.is_available):
        problems.append("is_available must be callable")
    if backend.validated_on not in spec.VALIDATION_LEVELS:
        problems.append(f"validated_on {backend.validated_on!r} must be one of "
                        f"{', '.join(spec.VALIDATION_LEVELS)}")
    if problems:
        raise PluginError(f"Backend plugin {plugin!r} registered an invalid backend: "
                          + "; ".join(problems) + ".")


def _one_line(exc: Exception) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def _renamed(exc: Exception, message: str) -> Exception:
    """The same exception type with ``message``; the original when its type takes no message."""
    try:
        return type(exc)(message)
    except Exception:  # noqa: BLE001 - an exotic constructor: keep the original
        return exc


def _protocol_members(protocol) -> list[str]:
    members = getattr(protocol, "__protocol_attrs__", None)
    if members is None:  # Python < 3.12
        from typing import _get_protocol_attrs  # type: ignore[attr-defined]

        members = _get_protocol_attrs(protocol)
    return sorted(members)


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
