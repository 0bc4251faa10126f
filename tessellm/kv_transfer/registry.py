"""Which KV connector classes exist, by name.

Built-in connectors are registered here; third-party packages register theirs through the
``tessellm.kv_connectors`` entry point group (``name = "pkg.module:ClassName"``, the way
backends use ``tessellm.backends``), or by calling ``register_kv_connector`` before the engine
starts, or by naming a module in ``kv_connector_module_path`` that defines a class named as
``kv_connector``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Union

from tessellm.kv_transfer.config import KVTransferConfig

ENTRY_POINT_GROUP = "tessellm.kv_connectors"

_BUILTIN = {"SharedStorageConnector": "tessellm.kv_transfer.shared_storage:SharedStorageConnector",
            "ZmqPeerConnector": "tessellm.kv_transfer.zmq_peer:ZmqPeerConnector"}


class KVConnectorRegistry:
    def __init__(self):
        self._targets: dict[str, Union[str, type]] = dict(_BUILTIN)
        self._entry_points_loaded = False

    def register(self, name: str, target: Union[str, type]) -> None:
        """``target``: the class, or ``"module:ClassName"`` imported when first used."""
        if not isinstance(target, (str, type)):
            raise TypeError(f"register_kv_connector({name!r}, ...) takes a class or a "
                            f"'module:ClassName' string, got {type(target).__name__}.")
        self._targets[name] = target

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._targets)

    def resolve(self, config: KVTransferConfig) -> type:
        """The class ``config.kv_connector`` names; one clear error when none does."""
        from tessellm.kv_transfer.base import KVConnectorBase

        name = config.kv_connector
        if config.kv_connector_module_path:
            try:
                module = importlib.import_module(config.kv_connector_module_path)
            except ImportError as exc:
                raise ValueError(f"kv_transfer_config's kv_connector_module_path "
                                 f"{config.kv_connector_module_path!r} cannot be imported ({exc}); "
                                 "install the package that provides it.") from None
            if name not in self._targets and hasattr(module, name):
                self._targets[name] = getattr(module, name)
        self._load_entry_points()
        target = self._targets.get(name)
        if target is None:
            raise ValueError(f"kv_transfer_config names kv_connector {name!r}, which is not "
                             f"registered; known connectors: {', '.join(self.names())}.")
        if isinstance(target, str):
            module_name, _, attr = target.partition(":")
            try:
                target = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as exc:
                raise ValueError(f"KV connector {name!r} is registered as {self._targets[name]!r}, "
                                 f"which cannot be loaded ({exc}).") from None
            self._targets[name] = target
        if not (isinstance(target, type) and issubclass(target, KVConnectorBase)):
            raise ValueError(f"KV connector {name!r} is {target!r}, not a subclass of "
                             "tessellm.kv_transfer.KVConnectorBase.")
        return target

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            self._targets.setdefault(ep.name, ep.value)  # built-in names are not replaced


_REGISTRY = KVConnectorRegistry()


def register_kv_connector(name: str, target: Union[str, type]) -> None:
    """Make ``name`` usable as ``kv_connector`` in this process (and in worker processes
    started after this call, when ``target`` is a ``"module:ClassName"`` string they can import)."""
    _REGISTRY.register(name, target)


def make_connector(config: KVTransferConfig, role, context):
    """The connector ``config`` names, built for ``role``."""
    return _REGISTRY.resolve(config)(config, role, context)


def connector_names() -> list[str]:
    return _REGISTRY.names()
