"""Plugin manager, entry-point discovery, validation and device selection.

Plugins load once per process through the ``tessellm.backends`` entry-point group (in-tree
backends included). ``TESSELLM_PLUGINS`` (comma-separated plugin names) limits which load.
"""

from __future__ import annotations

import functools
import importlib.metadata
from dataclasses import dataclass, replace
from typing import Optional

import pluggy

from tessellm import envs
from tessellm.backends import spec
from tessellm.backends.spec import Backend


class PluginError(RuntimeError):
    """A plugin failed to load or does not match the contract."""


class DeviceError(ValueError):
    """The requested device is unknown or not available here."""


@dataclass(frozen=True)
class PluginInfo:
    name: str  # entry-point name
    module: str
    api_required: int


class BackendRegistry:
    """The loaded plugins and the backends they registered."""

    def __init__(self, allowed: Optional[set[str]] = None, load_entry_points: bool = True):
        self.pm = pluggy.PluginManager(spec.PROJECT_NAME)
        self.pm.add_hookspecs(spec.BackendHookSpec)
        self.plugins: dict[str, PluginInfo] = {}
        self.backends: dict[str, Backend] = {}
        self.allowed = allowed
        if load_entry_points:
            for ep in importlib.metadata.entry_points(group=spec.ENTRY_POINT_GROUP):
                if allowed is None or ep.name in allowed:
                    self._load_entry_point(ep)
        self.collect_backends()

    # -- loading ---------------------------------------------------------------------------

    def _load_entry_point(self, ep) -> None:
        if ep.name in self.plugins:
            return  # the same distribution seen twice (e.g. editable + site install)
        try:
            module = ep.load()
        except Exception as exc:  # noqa: BLE001 - re-raised with the plugin's name
            raise PluginError(f"Backend plugin {ep.name!r} ({ep.value}) failed to import: "
                              f"{type(exc).__name__}: {exc}") from exc
        self.register_plugin(module, ep.name)

    def register_plugin(self, module, name: str) -> None:
        """Register a plugin object (module or instance) under ``name`` and validate it."""
        required = getattr(module, "TESSELLM_PLUGIN_API_REQUIRED", 1)
        if required > spec.TESSELLM_PLUGIN_API:
            raise PluginError(
                f"Backend plugin {name!r} needs tessellm plugin API {required}, but this tessellm "
                f"provides API {spec.TESSELLM_PLUGIN_API}; upgrade tessellm or use an older plugin.")
        self.pm.register(module, name=name)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(name=name)
            raise PluginError(f"Backend plugin {name!r} does not match the tessellm hook "
                              f"specification: {exc}") from exc
        self.plugins[name] = PluginInfo(name, getattr(module, "__name__", repr(module)), required)

    def collect_backends(self) -> None:
        self.backends.clear()
        for impl in self.pm.hook.tessellm_register_backends.get_hookimpls():
            plugin_name = impl.plugin_name

            def register(backend: Backend, _plugin=plugin_name) -> None:
                if not isinstance(backend, Backend):
                    raise PluginError(f"Backend plugin {_plugin!r} registered {backend!r}, "
                                      "which is not a tessellm.backends.spec.Backend.")
                other = self.backends.get(backend.name)
                if other is not None:
                    raise PluginError(f"Backend {backend.name!r} is registered by both "
                                      f"{other.plugin_name!r} and {_plugin!r}; uninstall one or "
                                      "limit plugins with TESSELLM_PLUGINS.")
                self.backends[backend.name] = replace(backend, plugin_name=_plugin)

            impl.function(**_hook_kwargs(impl, register=register))

    # -- selection -------------------------------------------------------------------------

    def available(self) -> list[Backend]:
        return [b for b in self.backends.values() if _safe_available(b)]

    def select(self, device: str = "auto") -> Backend:
        """The backend for ``device``: a backend name, or "auto" for the best available one."""
        if device != "auto":
            backend = self.backends.get(device)
            if backend is None:
                raise DeviceError(f"Unknown device {device!r}. Known backends: "
                                  f"{', '.join(sorted(self.backends)) or 'none'}; "
                                  "a third-party one is installed with pip as a plugin.")
            if not _safe_available(backend):
                raise DeviceError(f"Device {device!r} is not available on this machine. Available: "
                                  f"{', '.join(b.name for b in self.available()) or 'none'}.")
            return backend
        candidates = sorted(self.available(), key=lambda b: -b.priority)
        if not candidates:
            raise DeviceError("No backend is available; install tessellm with its cpu plugin.")
        top = [b for b in candidates if b.priority == candidates[0].priority]
        if len(top) > 1:
            names = ", ".join(f"{b.name} ({b.plugin_name})" for b in top)
            raise DeviceError(f"--device=auto is ambiguous: {names} share priority "
                              f"{top[0].priority}; pass --device explicitly.")
        return top[0]

    # -- pieces ----------------------------------------------------------------------------

    def provider(self, hook_name: str, backend: Backend, spec_obj) -> tuple[object, Optional[str]]:
        """Call a firstresult hook and also report which plugin answered."""
        hook = getattr(self.pm.hook, hook_name)
        for impl in reversed(hook.get_hookimpls()):  # pluggy's call order
            result = impl.function(**_hook_kwargs(impl, backend=backend, spec=spec_obj))
            if result is not None:
                return result, impl.plugin_name
        return None, None

    def attention_kernel(self, backend: Backend, attn_spec: spec.AttentionSpec):
        return self.provider("tessellm_attention_kernel", backend, attn_spec)[0]

    def fused_ops(self, backend: Backend, ops_spec: spec.OpsSpec):
        return self.provider("tessellm_fused_ops", backend, ops_spec)[0]

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
