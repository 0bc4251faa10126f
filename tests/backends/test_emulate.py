"""``LLM(device=..., emulate=True)``: a backend whose device is absent runs the whole engine on
its own kernels with host tensors, says so in every log line, and matches the cpu backend."""

from __future__ import annotations

import logging

import pytest

from tessellm.testing.harness import greedy_tokens

PROMPTS = [[1, 17, 33, 5], [2] + list(range(40, 60))]
ENGINE = dict(dtype="float32", block_size=16, num_kv_blocks=16, max_model_len=64, max_num_seqs=2)


def test_emulated_xpu_matches_cpu_and_says_emulated(tiny_llama, caplog):
    from tessellm import LLM
    from tessellm.backends.emulation import emulated_names

    cpu = greedy_tokens(LLM(tiny_llama, device="cpu", **ENGINE), PROMPTS, 6)
    with caplog.at_level(logging.INFO, logger="tessellm"):
        llm = LLM(tiny_llama, device="xpu", emulate=True, **ENGINE)
        backend = llm.engine.core.backend
        assert backend.name == "xpu" and backend.emulated and backend.device_type == "cpu"
        assert emulated_names() == ["xpu"]
        logging.getLogger("tessellm.test").info("a line")
        assert greedy_tokens(llm, PROMPTS, 6) == cpu
    records = [r for r in caplog.records if r.name.startswith("tessellm")]
    assert records and all(r.getMessage().startswith("[emulated xpu] ") for r in records)
    llm.shutdown()
    assert emulated_names() == []


def test_emulate_needs_an_explicit_device(tiny_llama):
    from tessellm import LLM

    with pytest.raises(ValueError, match="emulate needs an explicit device"):
        LLM(tiny_llama, emulate=True, **ENGINE)


def test_emulate_unknown_device_is_refused():
    from tessellm.backends.registry import DeviceError, get_registry

    with pytest.raises(DeviceError, match="Unknown device 'npu9'"):
        get_registry().select("npu9", emulate=True)
