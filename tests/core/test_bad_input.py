"""Bad input gets one clear error, and the engine keeps serving afterwards."""

from __future__ import annotations

import json
import os

import pytest

from tessellm import LLM, SamplingParams
from tessellm.backends.registry import DeviceError, get_registry

INVALID_PARAMS = [
    (dict(n=0), "n must be"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-3), "top_k"),
    (dict(min_p=1.5), "min_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=10, max_tokens=5), "min_tokens"),
    (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(frequency_penalty=-2.5), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(logprobs=-2), "logprobs"),
    (dict(prompt_logprobs=-2), "prompt_logprobs"),
    (dict(seed="abc"), "seed"),
    (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-4]), "stop_token_ids"),
    (dict(logit_bias={"x": 1.0}), "logit_bias"),
    # NaN / +inf made every logit NaN: garbage tokens (id 0), no error
    (dict(logit_bias={5: float("nan")}), "logit_bias value for token 5 must be a number below"),
    (dict(logit_bias={5: float("inf")}), "logit_bias"),
    (dict(logit_bias={5: "big"}), "logit_bias"),
]


@pytest.mark.parametrize("kwargs,field", INVALID_PARAMS)
def test_invalid_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir("llama"), dtype="float32", max_model_len=128)


GOOD = {"prompt_token_ids": [1, 2, 3]}


def _still_works(llm):
    out = llm.generate(GOOD, SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    core = llm.engine.core
    assert not core.has_unfinished_requests() and core.kv.num_free_blocks == core.kv.num_blocks


@pytest.mark.parametrize("prompt,msg", [
    ({"prompt_token_ids": []}, "empty"),
    ({"prompt_token_ids": list(range(200))}, "context length is 128"),
    ({"prompt_token_ids": [1, 99999]}, r"token ids must be integers in \[0, 384\)"),
    ("", "empty"),
    (3.5, "must be a string"),
])
def test_bad_prompts_rejected_engine_keeps_working(llm, prompt, msg):
    with pytest.raises(ValueError, match=msg):
        llm.generate([GOOD, prompt], SamplingParams(max_tokens=2), use_tqdm=False)
    _still_works(llm)


def test_send_failing_part_way_leaves_nothing_behind(llm, monkeypatch):
    """n = 2 whose second sample the core refuses (an injected failure of the hand-over, the
    way a request the engine process cannot decode fails): the first sample is aborted and
    the request unregistered, not left decoding for nobody."""
    core, calls = llm.engine.core, []
    add = core.add_request

    def second_fails(req):
        calls.append(req.request_id)
        if len(calls) == 2:
            raise ValueError("refused by the core")
        add(req)

    monkeypatch.setattr(core, "add_request", second_fails)
    with pytest.raises(ValueError, match="refused by the core"):
        llm.engine.add_request("n2", GOOD, SamplingParams(n=2, max_tokens=4))
    monkeypatch.undo()
    assert len(calls) == 2 and not llm.engine.outputs.has_request("n2")
    assert not core.has_unfinished_requests()
    _still_works(llm)


def test_string_prompt_without_tokenizer_is_explained(llm):
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("hello", use_tqdm=False)


def test_prompt_that_can_never_fit_the_cache(tiny_model_dir):
    small = LLM(tiny_model_dir("llama"), dtype="float32", num_kv_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="KV cache holds only 8 tokens"):
        small.generate({"prompt_token_ids": list(range(20))}, use_tqdm=False)
    _still_works(small)


def test_mismatched_sampling_params_count(llm):
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate([GOOD, GOOD], [SamplingParams()] * 3, use_tqdm=False)


def test_unknown_and_unavailable_device():
    with pytest.raises(DeviceError, match="Unknown device 'npu9'.*cpu"):
        get_registry().select("npu9")
    if not get_registry().backends["cuda"].is_available():
        with pytest.raises(DeviceError, match="not available.*Available: cpu"):
            get_registry().select("cuda")


def test_unsupported_architecture(tmp_path):
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 100,
              "n_embd": 32, "n_layer": 1, "n_head": 2}
    with open(os.path.join(tmp_path, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*not supported.*LlamaForCausalLM"):
        LLM(str(tmp_path), load_format="dummy")


def test_invalid_engine_args(tiny_model_dir):
    with pytest.raises(ValueError, match="dtype"):
        LLM(tiny_model_dir("llama"), dtype="int3")
    with pytest.raises(ValueError, match="max_model_len 4096 exceeds"):
        LLM(tiny_model_dir("llama"), max_model_len=4096)


def test_dtype_given_as_torch_dtype():
    """vLLM's LLM(dtype=torch.bfloat16): a torch.dtype is accepted as its name; others refused."""
    import torch
    from tessellm.config import EngineArgs
    for dtype, name in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16"), (torch.float16, "float16")):
        args = EngineArgs(dtype=dtype)
        args.validate()
        assert args.dtype == name
    with pytest.raises(ValueError, match="dtype 'float64' is not supported.*torch.bfloat16"):
        EngineArgs(dtype=torch.float64).validate()
