"""What names one LoRA adapter: the ``LoRARequest`` a caller attaches to a request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class LoRARequest:
    """One PEFT adapter: a name, a positive integer id unique per adapter, and its directory.

    ``LoRARequest("sql", 1, "/adapters/sql")`` (vLLM's positional order). Two requests with the
    same id must name the same files: the id keys the caches (slots, CPU cache, prefix cache).
    """

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self):
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"LoRARequest {self.lora_name!r} has id {self.lora_int_id!r}; "
                             "give a positive integer, one per adapter.")
        if not self.lora_name or not self.lora_path:
            raise ValueError("A LoRARequest needs a name and the adapter's directory "
                             "(LoRARequest(name, id, path)).")

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def id(self) -> int:
        return self.lora_int_id

    @property
    def path(self) -> str:
        return self.lora_path

    def to_dict(self) -> dict:
        """Plain data for msgpack (the engine process, the workers)."""
        return {"name": self.lora_name, "id": self.lora_int_id, "path": self.lora_path}

    @staticmethod
    def from_dict(d: Optional[dict]) -> Optional["LoRARequest"]:
        return None if d is None else LoRARequest(d["name"], int(d["id"]), d["path"])


def lora_off_error(lora: LoRARequest) -> ValueError:
    """The error for an adapter given to an engine that runs without LoRA."""
    return ValueError(f"LoRA adapter {lora.lora_name!r} was given but the engine runs without LoRA; "
                      "pass enable_lora=True (--enable-lora).")
