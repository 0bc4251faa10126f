"""``--kv-transfer-config``: which KV connector an engine runs and in which role (vLLM's flag).

Torch-free: the engine arguments validate it before anything is loaded.

    --kv-transfer-config '{"kv_connector": "SharedStorageConnector", "kv_role": "kv_both",
                           "kv_connector_extra_config": {"shared_storage_path": "/tmp/kv"}}'

Roles: ``kv_producer`` saves the KV of the blocks it computes, ``kv_consumer`` loads what it
finds, ``kv_both`` does both (a cache shared by several engines).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from tessellm.json_arg import json_object_arg

ROLES = ("kv_producer", "kv_consumer", "kv_both")
EXAMPLE = ('{"kv_connector": "SharedStorageConnector", "kv_role": "kv_both", '
           '"kv_connector_extra_config": {"shared_storage_path": "/tmp/kv"}}')


@dataclass(frozen=True)
class KVTransferConfig:
    kv_connector: str  # a registered connector's name (tessellm.kv_transfer.registry)
    kv_role: str = "kv_both"  # one of ROLES
    # The connector's own settings (SharedStorageConnector: {"shared_storage_path": dir}).
    kv_connector_extra_config: dict = field(default_factory=dict)
    # A module to import first, which defines ``kv_connector`` (a class of that name) or
    # registers it (vLLM's ``kv_connector_module_path``); None: the registry alone.
    kv_connector_module_path: Optional[str] = None

    @property
    def is_producer(self) -> bool:
        return self.kv_role in ("kv_producer", "kv_both")

    @property
    def is_consumer(self) -> bool:
        return self.kv_role in ("kv_consumer", "kv_both")

    def to_dict(self) -> dict:
        return {"kv_connector": self.kv_connector, "kv_role": self.kv_role,
                "kv_connector_extra_config": dict(self.kv_connector_extra_config),
                "kv_connector_module_path": self.kv_connector_module_path}


def parse_kv_transfer_config(value) -> Optional[KVTransferConfig]:
    """``kv_transfer_config`` (a dict, its JSON text, a ``KVTransferConfig`` or None) checked:
    one ValueError naming the problem and the fix otherwise. The connector's name is looked up
    in the registry only when the engine builds it (``make_connector``)."""
    if value is None or isinstance(value, KVTransferConfig):
        return value
    d = json_object_arg(value, "kv_transfer_config", EXAMPLE)
    known = {"kv_connector", "kv_role", "kv_connector_extra_config", "kv_connector_module_path"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"kv_transfer_config has unknown key(s) {unknown}; tessellm reads "
                         f"{sorted(known)}, e.g. '{EXAMPLE}'.")
    name = d.get("kv_connector")
    if not isinstance(name, str) or not name:
        raise ValueError(f"kv_transfer_config needs \"kv_connector\", the connector's name "
                         f"(built in: SharedStorageConnector, ZmqPeerConnector), e.g. '{EXAMPLE}'.")
    role = d.get("kv_role", "kv_both")
    if role not in ROLES:
        raise ValueError(f"kv_transfer_config's kv_role must be one of {', '.join(ROLES)}, "
                         f"got {role!r}.")
    extra = d.get("kv_connector_extra_config") or {}
    if not isinstance(extra, dict):
        raise ValueError(f"kv_transfer_config's kv_connector_extra_config must be a JSON object, "
                         f"got {type(extra).__name__}.")
    module = d.get("kv_connector_module_path")
    if module is not None and not isinstance(module, str):
        raise ValueError("kv_transfer_config's kv_connector_module_path must be a module name "
                         f"such as 'my_pkg.connector', got {module!r}.")
    return KVTransferConfig(name, role, dict(extra), module)
