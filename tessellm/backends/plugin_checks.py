"""Checks of a plugin's shape at load time: API version, hook names, wrappers, Backend fields.

Each raises ``PluginError`` with one sentence naming the plugin and the fix.
"""

from __future__ import annotations

import re

import pluggy

from tessellm.backends import spec
from tessellm.backends.spec import Backend

_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]*$")


class PluginError(RuntimeError):
    """A plugin failed to load or does not match the contract."""


def api_required(module, name: str) -> int:
    required = getattr(module, spec.API_REQUIRED_ATTR, 1)
    if not isinstance(required, int) or isinstance(required, bool) or required < 1:
        raise PluginError(f"Backend plugin {name!r} sets {spec.API_REQUIRED_ATTR} = "
                          f"{required!r}; it must be a positive integer.")
    if required > spec.TESSELLM_PLUGIN_API:
        raise PluginError(
            f"Backend plugin {name!r} needs tessellm plugin API {required}, but this tessellm "
            f"provides API {spec.TESSELLM_PLUGIN_API}; upgrade tessellm or use an older plugin.")
    return required


def check_hook_names(module, name: str) -> None:
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


def check_no_wrappers(pm: pluggy.PluginManager, name: str) -> None:
    plugin = pm.get_plugin(name)
    for caller in pm.get_hookcallers(plugin) or []:
        for impl in caller.get_hookimpls():
            if impl.plugin_name == name and (impl.hookwrapper or getattr(impl, "wrapper", False)):
                raise PluginError(f"Backend plugin {name!r} implements {caller.name} as a "
                                  "wrapper; tessellm hooks take plain implementations (use "
                                  "tryfirst=True to override another plugin).")


def check_backend(backend, plugin: str) -> None:
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


def one_line(exc: Exception) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def renamed(exc: Exception, message: str) -> Exception:
    """The same exception type with ``message``; the original when its type takes no message."""
    try:
        return type(exc)(message)
    except Exception:  # noqa: BLE001 - an exotic constructor: keep the original
        return exc


def protocol_members(protocol) -> list[str]:
    members = getattr(protocol, "__protocol_attrs__", None)
    if members is None:  # Python < 3.12
        from typing import _get_protocol_attrs  # type: ignore[attr-defined]

        members = _get_protocol_attrs(protocol)
    return sorted(members)




def overrides(module, name: str) -> tuple[str, ...]:
    """The plugin's ``TESSELLM_OVERRIDES``: backend names it may answer for though it does not
    own them."""
    value = getattr(module, spec.OVERRIDES_ATTR, ())
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise PluginError(f"Backend plugin {name!r} sets {spec.OVERRIDES_ATTR} = {value!r}; it "
                          "must be a tuple of backend names, e.g. (\"cpu\",).")
    return tuple(value)
