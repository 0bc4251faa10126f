"""Logits processors installed as entry points (a package's ``[project.entry-points]``): the
``tessellm.logits_processors`` group's load or stop the engine; a ``vllm.logits_processors``
one that fails under tessellm (a package written for vLLM) is skipped with a warning naming its
package, unless the user names its class, which then fails clearly. The packages are real
distributions (a ``.dist-info`` folder) on ``sys.path``, found by ``importlib.metadata``."""

from __future__ import annotations

import logging

import pytest

from tessellm import LLM, SamplingParams
from tessellm.sample.logits_processor.load import load_classes
from tests.sampling.logits_procs import DummyLogitsProcessor

BROKEN_MODULE = "vllm_only_logitsproc_pkg"


def _install(root, dist: str, group: str, name: str, value: str) -> None:
    info = root / f"{dist}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n{name} = {value}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path for the packages, with a module that fails to import as one written
    for vLLM does where vLLM is absent."""
    (tmp_path / f"{BROKEN_MODULE}.py").write_text("raise ImportError(\"No module named 'vllm'\")\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_a_failing_vllm_plugin_is_a_warning_naming_its_package(site, caplog, tokenized_model):
    _install(site, "vllm-only-procs", "vllm.logits_processors", "broken", f"{BROKEN_MODULE}:Proc")
    _install(site, "ported-procs", "vllm.logits_processors", "dummy",
             "tests.sampling.logits_procs:DummyLogitsProcessor")
    with caplog.at_level(logging.WARNING, logger="tessellm.sample.logits_processor.load"):
        assert load_classes() == [DummyLogitsProcessor]
    (warning,) = [r.getMessage() for r in caplog.records if "Skipping" in r.getMessage()]
    assert "package vllm-only-procs" in warning and "No module named 'vllm'" in warning
    assert "uninstall vllm-only-procs" in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tessellm.sample.logits_processor.load"):
        with LLM(tokenized_model, device="cpu", dtype="float32", num_kv_blocks=64) as llm:  # it starts
            (out,) = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=3,
                                                          extra_args={"target_token": 7}), use_tqdm=False)
    assert list(out.outputs[0].token_ids) == [7, 7, 7]  # the working plugin applies
    assert sum("Skipping" in r.getMessage() for r in caplog.records) == 1  # the engine core's, once


def test_a_named_class_of_a_failing_vllm_plugin_fails_clearly(site):
    _install(site, "vllm-only-procs", "vllm.logits_processors", "broken", f"{BROKEN_MODULE}:Proc")
    with pytest.raises(ValueError, match=f"logits processor '{BROKEN_MODULE}:Proc' cannot be loaded.*vllm"):
        load_classes([f"{BROKEN_MODULE}:Proc"])


def test_a_failing_tessellm_plugin_stops_the_engine(site):
    _install(site, "tessellm-procs", "tessellm.logits_processors", "broken", f"{BROKEN_MODULE}:Proc")
    with pytest.raises(ValueError, match="plugin broken .*package tessellm-procs.*failed to load.*fix or uninstall"):
        load_classes()


def test_speculative_decoding_skips_installed_plugins_and_refuses_named_ones(site, caplog, tokenized_model):
    """vLLM's rule: under speculative decoding a processor given by name stops the start (naming
    the fix); an installed one is not used, with a warning, and the engine serves."""
    _install(site, "ported-procs", "vllm.logits_processors", "dummy",
             "tests.sampling.logits_procs:DummyLogitsProcessor")
    spec = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2}
    engine = dict(device="cpu", dtype="float32", num_kv_blocks=64, speculative_config=spec)
    with pytest.raises(ValueError, match=r"\(DummyLogitsProcessor\) do not combine with speculative decoding.*"
                                         "drop speculative_config or logits_processors"):
        LLM(tokenized_model, **engine, logits_processors=[DummyLogitsProcessor])
    with caplog.at_level(logging.WARNING, logger="tessellm.sample.logits_processor.load"):
        with LLM(tokenized_model, **engine) as llm:
            (out,) = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True,
                                                          extra_args={"target_token": 7}), use_tqdm=False)
    assert list(out.outputs[0].token_ids) != [7, 7, 7]  # not applied
    assert any("plugins not used (speculative decoding is on): dummy" in r.getMessage() for r in caplog.records)
