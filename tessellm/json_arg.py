"""Engine arguments given as a dict or as its JSON text (``--speculative-config``,
``--pooler-config``, ``--override-generation-config``). Torch-free: the scheduler's imports reach it."""

from __future__ import annotations

import json


def json_object_arg(value, name: str, example: str) -> dict:
    """An engine argument given as a dict or as its JSON text, as a dict; one ValueError naming
    ``name`` and showing ``example`` otherwise. ``None`` is ``{}``."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name} is not valid JSON ({exc.msg} at character {exc.pos}); "
                             f"give an object such as '{example}'.") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, got {type(value).__name__}; "
                         f"give e.g. '{example}'.")
    return value
