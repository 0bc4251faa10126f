"""Which runner an engine is and how it pools, without a model: EngineArgs' runner / task /
convert, bare architectures, sentence-transformers files, pooler_config; PoolingParams checks."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

from tessellm.config import EngineArgs
from tessellm.pooling.config import (is_bare_model, parse_pooler_override, resolve_runner,
                                     sentence_transformers_pooling)
from tessellm.pooling.params import PoolingParams


def _config(*archs):
    return SimpleNamespace(architectures=list(archs), hidden_size=64)


@pytest.mark.parametrize("archs,args,runner", [
    (["Qwen3ForCausalLM"], {}, "generate"),
    (["Qwen3Model"], {}, "pooling"),
    (["MistralModel"], {}, "pooling"),
    (["Qwen3ForCausalLM"], {"runner": "pooling"}, "pooling"),
    (["Qwen3ForCausalLM"], {"task": "embed"}, "pooling"),
    (["Qwen3ForCausalLM"], {"convert": "embed"}, "pooling"),
    (["Qwen3Model"], {"task": "embedding"}, "pooling"),
    (["LlamaForSequenceClassification"], {}, "pooling"),  # vLLM: a classifier pools under auto
    (["Qwen3ForCausalLM"], {"task": "classify"}, "pooling"),
    (["Qwen2ForSequenceClassification"], {"task": "score"}, "pooling"),
])
def test_runner_resolution(archs, args, runner):
    assert resolve_runner(EngineArgs(**args), _config(*archs)) == runner


def test_bare_model_cannot_be_forced_to_generate():
    assert is_bare_model(_config("Qwen3Model")) and not is_bare_model(_config("Qwen3ForCausalLM"))
    with pytest.raises(ValueError, match="runner='pooling'"):
        resolve_runner(EngineArgs(runner="generate"), _config("Qwen3Model"))
    with pytest.raises(ValueError, match="sequence classifier: it can classify and score but not generate"):
        resolve_runner(EngineArgs(runner="generate"), _config("LlamaForSequenceClassification"))


@pytest.mark.parametrize("args,message", [
    ({"runner": "embed"}, "runner 'embed' is not supported"),
    ({"task": "reward"}, "task 'reward' is not supported"),
    ({"convert": "reward"}, "convert 'reward' is not supported"),
    ({"runner": "generate", "convert": "embed"}, "disagree"),
    ({"pooler_config": '{"pooling_type": "mean", "dimensions": 4}'}, "key 'dimensions'"),
    ({"override_pooler_config": {"normalize": "yes"}}, "normalize must be true or false"),
    ({"pooler_config": {"use_activation": 1}}, "use_activation must be true or false"),
    ({"pooler_config": {"softmax": True, "use_activation": False}}, "use_activation .* twice"),
])
def test_engine_args_refuse_bad_values(args, message):
    with pytest.raises(ValueError, match=message):
        EngineArgs(**args).validate()


def test_pooler_override_spellings():
    assert parse_pooler_override('{"pooling_type": "cls"}') == {"pooling_type": "CLS"}
    assert parse_pooler_override({"normalize": False}) == {"normalize": False}
    for key in ("use_activation", "softmax", "activation"):  # vLLM's name and its deprecated ones
        assert parse_pooler_override({key: False}) == {"use_activation": False}
    with pytest.raises(ValueError, match="must be a JSON object"):
        parse_pooler_override("[1]")


def _st_dir(tmp_path, pooling: dict, normalize: bool) -> str:
    modules = [{"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    os.makedirs(tmp_path / "1_Pooling")
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return str(tmp_path)


@pytest.mark.parametrize("pooling,normalize,expected", [
    ({"pooling_mode_lasttoken": True, "pooling_mode_mean_tokens": False}, True,
     {"pooling_type": "LAST", "normalize": True}),
    ({"pooling_mode_cls_token": True}, False, {"pooling_type": "CLS", "normalize": False}),
    ({"pooling_mode": "mean"}, True, {"pooling_type": "MEAN", "normalize": True}),
    ({"pooling_mode_max_tokens": True}, True, {"normalize": True}),  # MAX: not supported, LAST stays
])
def test_sentence_transformers_files(tmp_path, pooling, normalize, expected):
    assert sentence_transformers_pooling(_st_dir(tmp_path, pooling, normalize)) == expected


def test_no_sentence_transformers_files(tmp_path):
    assert sentence_transformers_pooling(str(tmp_path)) == {}


def test_pooling_params_apply_truncates_then_normalizes():
    v = np.array([3.0, 4.0, 12.0], dtype=np.float32)
    np.testing.assert_allclose(PoolingParams(dimensions=2).apply(v, True), [0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(PoolingParams(normalize=False).apply(v, True), v)
    np.testing.assert_allclose(PoolingParams().apply(v, True), v / 13.0, rtol=1e-6)
    assert PoolingParams().apply(np.zeros(3), True).tolist() == [0.0, 0.0, 0.0]  # no 0/0


def test_classifier_activation_is_softmax_or_sigmoid():
    logits = np.array([1.0, -2.0, 0.5], dtype=np.float32)
    softmax = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(PoolingParams(task="classify").apply(logits, True), softmax, rtol=1e-6)
    np.testing.assert_allclose(PoolingParams(task="classify").apply(logits[:1], True), [1 / (1 + np.exp(-1.0))],
                               rtol=1e-6)
    np.testing.assert_array_equal(PoolingParams(task="classify", use_activation=False).apply(logits, True), logits)


@pytest.mark.parametrize("params,message", [
    (PoolingParams(dimensions=65), "more than this model's embedding size 64"),
    (PoolingParams(dimensions=True), "positive integer"),
    (PoolingParams(dimensions=24), r"use one of \[16, 32\]"),
    (PoolingParams(truncate_prompt_tokens=0), "truncate_prompt_tokens"),
    (PoolingParams(normalize="no"), "normalize must be true or false"),
])
def test_pooling_params_verify(params, message):
    with pytest.raises(ValueError, match=message) as info:
        params.verify(64, [16, 32] if params.dimensions == 24 else None)
    assert info.value.param in ("dimensions", "truncate_prompt_tokens", "normalize")
