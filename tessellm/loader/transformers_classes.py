"""transformers' classes and model types by name, resolved when a model that needs them loads.

tessellm supports ``transformers >= TRANSFORMERS_FLOOR`` (pyproject.toml; measured: README,
"Requirements"). The core (Llama, Mistral, Qwen2 checkpoints, the bundled SmolLM2 GGUF) needs
nothing newer. A family transformers added later (Gemma 3, Qwen3, Olmo 2, Glm4, Exaone, ...)
needs a newer release only when a model of that family loads:

    import tessellm                    -> no transformers class newer than the floor is imported
    LLM("a Qwen3 checkpoint")          -> transformers_class("Qwen3Config", "Qwen3")  or
                                          AutoConfig on config.json's model_type "qwen3"
        transformers has it            -> the class
        transformers lacks it          -> one TransformersTooOld (a ValueError): the family, the
                                          installed release,
                                          pip install -U "transformers>=4.51.3"

Invariant (tests/loader/test_transformers_floor.py): tessellm's ``from transformers import X``
names only that test's allow-list (all present at the floor); anything newer is resolved here by
name, with its first release in ``FIRST_RELEASE``. ``dtype_kwargs`` spells from_pretrained's
dtype argument as the installed release wants it.
"""

from __future__ import annotations

import json
import os
from typing import Optional

TRANSFORMERS_FLOOR = "4.48"  # pyproject.toml says the same (tests/loader/test_transformers_floor.py)

# Class name or config.json ``model_type`` -> the first transformers release found to have it,
# for the names tessellm resolves that are newer than the floor. Measured from the release wheels
# (the config classes and CONFIG_MAPPING_NAMES of each minor release's last patch, 4.45.2 to
# 5.25.0), so a version here is that minor's last patch: true for it, maybe for earlier patches.
FIRST_RELEASE = {
    # config classes resolved by name (GGUF loader, gguf_gemma3.py)
    "Gemma3TextConfig": "4.50.3", "Glm4Config": "4.51.3", "Qwen3Config": "4.51.3",
    "Qwen3MoeConfig": "4.51.3", "ExaoneConfig": "5.24.0",
    # config.json model types of the families in models/registry.py
    "granitemoeshared": "4.49.0", "qwen2_5_vl": "4.49.0", "gemma3": "4.50.3",
    "gemma3_text": "4.50.3", "mistral3": "4.50.3", "deepseek_v3": "4.51.3", "glm4": "4.51.3",
    "llama4": "4.51.3", "qwen3": "4.51.3", "qwen3_moe": "4.51.3", "granitemoehybrid": "4.52.4",
    "dots1": "4.53.3", "falcon_h1": "4.53.3", "smollm3": "4.53.3", "deepseek_v2": "4.54.1",
    "ernie4_5": "4.54.1", "ernie4_5_moe": "4.54.1", "exaone4": "4.54.1", "glm4_moe": "4.54.1",
    "gpt_oss": "4.55.4", "apertus": "4.56.2", "hunyuan_v1_dense": "4.56.2",
    "hunyuan_v1_moe": "4.56.2", "seed_oss": "4.56.2", "olmo3": "4.57.6", "qwen3_next": "4.57.6",
    "qwen3_vl": "4.57.6", "qwen3_vl_moe": "4.57.6", "ministral3": "5.0.0", "nemotron_h": "5.3.0",
    "exaone": "5.24.0",
}


class TransformersTooOld(ValueError):
    """A model needs a transformers class or model type the installed release lacks."""


def _installed_version() -> str:
    import transformers

    return transformers.__version__


def dtype_kwargs(dtype) -> dict:
    """transformers' ``from_pretrained`` / ``from_config`` dtype argument: ``dtype`` from 4.56 on,
    ``torch_dtype`` before (a later release still takes that one, with a deprecation warning)."""
    from packaging.version import Version

    return {"dtype" if Version(_installed_version()) >= Version("4.56") else "torch_dtype": dtype}


def upgrade_message(subject: str, needs: str, since: Optional[str]) -> str:
    """One sentence: what is loaded, what it needs, the installed transformers, the fix."""
    floor = f"transformers>={since}" if since else "transformers"
    newer = f" (new in transformers {since})" if since else ""
    return (f"{subject} needs transformers' {needs}{newer}, which the installed transformers "
            f"{_installed_version()} lacks; fix: pip install -U \"{floor}\"")


def transformers_class(name: str, family: str):
    """transformers' class ``name`` (e.g. ``"Qwen3Config"``) for a model of ``family``; a
    TransformersTooOld naming the family, the installed release and the fix where it lacks it."""
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None:
        raise TransformersTooOld(upgrade_message(f"A {family} model", name, FIRST_RELEASE.get(name)))
    return cls


def auto_config(path: str):
    """``AutoConfig.from_pretrained(path)``; a checkpoint of a family newer than this transformers
    (its ``model_type`` in FIRST_RELEASE, unknown here) is TransformersTooOld instead of
    transformers' own error. Other unknown types keep that error (custom code, a typo)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = _model_type(path)
    if model_type in FIRST_RELEASE and model_type not in CONFIG_MAPPING:
        raise TransformersTooOld(upgrade_message(f"The {model_type!r} checkpoint {path}",
                                                 f"{model_type!r} config", FIRST_RELEASE[model_type]))
    return AutoConfig.from_pretrained(path)


def _model_type(path: str) -> Optional[str]:
    """config.json's ``model_type``, or None where there is none (or no readable config.json)."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return model_type if isinstance(model_type, str) else None
