"""The transformers floor: tessellm imports only what the floor release has; newer families'
classes and model types resolve by name, a missing one being one clear error naming the fix.

No network: the source is scanned (AST) against an allow-list of names present at the floor
(run this file under transformers 4.48.3 to re-check the list: the last test imports each).
"""

import ast
import json
import pathlib
import re
import tomllib

import pytest
import transformers
from packaging.version import Version

from tessellm.config import resolve_model
from tessellm.loader import transformers_classes
from tessellm.loader.gguf_loader import _ARCHITECTURES
from tessellm.loader.transformers_classes import (FIRST_RELEASE, TRANSFORMERS_FLOOR,
                                                  TransformersTooOld, auto_config,
                                                  transformers_class)

ROOT = pathlib.Path(__file__).resolve().parents[2]

# transformers classes present in the floor release (4.48.3 and 4.45.2 measured, both wheels and
# venvs): what tessellm may import from transformers, and the older GGUF families' configs. A
# class newer than the floor goes through transformers_classes.transformers_class instead.
CLASSES_AT_FLOOR = {
    "AutoConfig", "AutoImageProcessor", "AutoModelForCausalLM", "AutoProcessor", "AutoTokenizer",
    "LlavaNextProcessor", "PreTrainedTokenizerFast", "PretrainedConfig",
    "CohereConfig", "FalconConfig", "GemmaConfig", "Gemma2Config", "GPTNeoXConfig", "LlamaConfig",
    "Olmo2Config", "PhiConfig", "Phi3Config", "Qwen2Config", "Qwen2MoeConfig", "Starcoder2Config"}
AT_FLOOR = ({("transformers", name) for name in CLASSES_AT_FLOOR}
            | {("transformers.models.auto.configuration_auto", "CONFIG_MAPPING")})


def _transformers_imports():
    """(module, name, file:line) of every ``from transformers... import name`` in tessellm/."""
    for path in sorted((ROOT / "tessellm").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "transformers":
                for alias in node.names:
                    yield node.module, alias.name, f"{path.relative_to(ROOT)}:{node.lineno}"


def test_tessellm_imports_only_names_the_floor_release_has():
    found = list(_transformers_imports())
    assert found, "the scan found no transformers import at all"
    newer = [f"{where}: from {module} import {name}" for module, name, where in found
             if (module, name) not in AT_FLOOR]
    assert not newer, (
        f"transformers names outside the floor's allow-list ({TRANSFORMERS_FLOOR}): {newer}; resolve a "
        "newer class with tessellm.loader.transformers_classes.transformers_class(name, family) "
        "and add its first release to FIRST_RELEASE, or (if transformers "
        f"{TRANSFORMERS_FLOOR} has it) add it to AT_FLOOR here.")


def test_every_gguf_config_class_is_at_the_floor_or_has_its_release():
    names = {config for _, config, _ in _ARCHITECTURES.values() if config}
    unknown = sorted(names - CLASSES_AT_FLOOR - set(FIRST_RELEASE))
    assert not unknown, f"GGUF config classes with no known first release: {unknown}"


def test_first_releases_are_above_the_floor():
    floor = Version(TRANSFORMERS_FLOOR)
    assert all(Version(v) > floor for v in FIRST_RELEASE.values()), FIRST_RELEASE


def test_pyproject_and_readme_state_the_same_floor():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"transformers>={TRANSFORMERS_FLOOR}" in deps
    assert f"transformers >= {TRANSFORMERS_FLOOR}" in (ROOT / "README.md").read_text()


def test_installed_transformers_is_at_least_the_floor():
    assert Version(transformers.__version__) >= Version(TRANSFORMERS_FLOOR)


def test_allow_list_names_exist_in_the_installed_transformers():
    """Under transformers 4.48.3 this checks the allow-list at the floor (a typo anywhere)."""
    import importlib

    missing = [f"{m}.{n}" for m, n in AT_FLOOR if not hasattr(importlib.import_module(m), n)]
    assert not missing


def test_a_class_this_release_has_resolves():
    assert transformers_class("LlamaConfig", "Llama") is transformers.LlamaConfig


def test_a_missing_class_is_one_error_naming_family_release_and_fix(monkeypatch):
    assert issubclass(TransformersTooOld, ValueError)  # the CLI prints a ValueError as one line
    monkeypatch.setitem(FIRST_RELEASE, "NoSuchConfig", "99.1.0")
    with pytest.raises(TransformersTooOld) as info:
        transformers_class("NoSuchConfig", "Nosuch")
    message = str(info.value)
    assert message.startswith("A Nosuch model needs transformers' NoSuchConfig (new in "
                              "transformers 99.1.0)")
    assert f"installed transformers {transformers.__version__} lacks" in message
    assert message.endswith('fix: pip install -U "transformers>=99.1.0"')


def test_a_missing_class_of_unknown_release_still_names_the_fix():
    with pytest.raises(ValueError, match=r"transformers' OtherConfig, which the installed "
                                         r"transformers .* lacks; fix: pip install -U \"transformers\"$"):
        transformers_class("OtherConfig", "Other")


def _checkpoint(tmp_path, model_type: str) -> str:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type,
                                                      "architectures": ["XForCausalLM"]}))
    return str(tmp_path)


def test_a_model_type_this_release_lacks_is_one_clear_error(tmp_path, monkeypatch):
    """What a Qwen3 checkpoint gives under transformers 4.48: tessellm's error, not
    transformers' KeyError, from the same path LLM(...) takes (config.resolve_model)."""
    monkeypatch.setitem(FIRST_RELEASE, "no_such_type", "99.2.0")
    path = _checkpoint(tmp_path, "no_such_type")
    with pytest.raises(TransformersTooOld, match=re.escape(
            f"The 'no_such_type' checkpoint {path} needs transformers' 'no_such_type' config (new in "
            f"transformers 99.2.0), which the installed transformers {transformers.__version__} "
            'lacks; fix: pip install -U "transformers>=99.2.0"')):
        resolve_model(path)


def test_an_unknown_model_type_of_no_listed_family_keeps_transformers_error(tmp_path):
    """Not a newer release's family (custom code, a typo): transformers' own error, which says so."""
    with pytest.raises(ValueError) as info:
        auto_config(_checkpoint(tmp_path, "no_such_type"))
    assert not isinstance(info.value, TransformersTooOld) and "no_such_type" in str(info.value)


def test_a_known_model_type_loads_its_config(tmp_path):
    config = auto_config(_checkpoint(tmp_path, "llama"))
    assert type(config) is transformers.LlamaConfig


def test_dtype_argument_is_spelled_as_the_installed_release_wants():
    import torch

    new = Version(transformers.__version__) >= Version("4.56")
    assert transformers_classes.dtype_kwargs(torch.float16) == {
        ("dtype" if new else "torch_dtype"): torch.float16}
