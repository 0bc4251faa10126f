"""Default sampling parameters from the model's ``generation_config.json``, as vLLM applies them.

Model authors put their recommended sampling in ``generation_config.json`` (Qwen2.5:
temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05). vLLM (``--generation-config
auto``, its default) uses those values for every request field the request leaves unset, and so
does tessellm: the same request gives the same kind of sample on both engines.

- ``generation_config="auto"``: the model directory's ``generation_config.json`` (a GGUF file
  carries none, so the bundled model keeps the neutral defaults);
- ``"vllm"``: none of it, tessellm's neutral defaults (temperature 1, top_p 1, no top_k);
- a directory: the ``generation_config.json`` in it.

``override_generation_config`` (a dict or its JSON) is laid over the file's values, e.g.
``{"temperature": 0.5}``. Only the sampling fields below are taken; ``max_new_tokens`` becomes
``max_tokens``, the default output budget (a request's own ``max_tokens`` wins). ``do_sample`` is
ignored, as in vLLM.

Explicit values in a request always win; ``LLM.generate`` without sampling params and the
server's requests both start from ``default_sampling_params``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

from tessellm.json_arg import json_object_arg

logger = logging.getLogger(__name__)

# generation_config.json key -> SamplingParams field
FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
          "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def parse_override(value) -> dict:
    """``override_generation_config`` as a dict (ValueError naming the problem)."""
    value = json_object_arg(value, "override_generation_config", '{"temperature": 0.5}')
    unknown = sorted(set(value) - set(FIELDS))
    if unknown:
        raise ValueError(f"override_generation_config has unknown keys {unknown}; the sampling "
                         f"defaults it can set are {sorted(FIELDS)}.")
    return value


def check_choice(choice: str) -> None:
    if choice not in ("auto", "vllm") and not os.path.isdir(choice):
        raise ValueError(f"generation_config {choice!r} is neither 'auto', 'vllm' nor a directory "
                         "holding a generation_config.json.")


def default_sampling(model_dir: Optional[str], choice: str = "auto", override=None) -> dict:
    """The SamplingParams fields (by their SamplingParams names) this model's requests default to.

    ``model_dir``: the model's directory, None for a GGUF file."""
    check_choice(choice)
    folder = None if choice == "vllm" else (model_dir if choice == "auto" else choice)
    values: dict = {}
    path = os.path.join(folder, "generation_config.json") if folder else None
    if path and os.path.isfile(path):
        with open(path) as f:
            raw = json.load(f)
        values = {k: raw[k] for k in FIELDS if raw.get(k) is not None}
    values.update(parse_override(override))
    out = {FIELDS[k]: v for k, v in values.items()}
    if out:
        logger.info("Default sampling parameters from the model's generation config: %s (a request's "
                    "own values win; --generation-config vllm turns this off).", out)
    return out

