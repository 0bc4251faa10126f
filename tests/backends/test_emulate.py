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

    # What this process already emulates: an engine another test module (run earlier in this
    # process, in whatever order pytest-xdist gives a worker its files) has not shut down
    # still marks the log records with its backend. This test is about its own engine.
    before = emulated_names()
    cpu = greedy_tokens(LLM(tiny_llama, device="cpu", **ENGINE), PROMPTS, 6)
    with caplog.at_level(logging.INFO, logger="tessellm"):
        llm = LLM(tiny_llama, device="xpu", emulate=True, **ENGINE)
        backend = llm.engine.core.backend
        assert backend.name == "xpu" and backend.emulated and backend.device_type == "cpu"
        assert emulated_names() == sorted({*before, "xpu"})
        logging.getLogger("tessellm.test").info("a line")
        assert greedy_tokens(llm, PROMPTS, 6) == cpu
    prefix = f"[emulated {','.join(sorted({*before, 'xpu'}))}] "
    records = [r for r in caplog.records if r.name.startswith("tessellm")]
    assert records and all(r.getMessage().startswith(prefix) for r in records)
    llm.shutdown()
    assert emulated_names() == before


def test_emulate_needs_an_explicit_device(tiny_llama):
    from tessellm import LLM

    with pytest.raises(ValueError, match="emulate needs an explicit device"):
        LLM(tiny_llama, emulate=True, **ENGINE)


@pytest.mark.parametrize("device", ["cuda", "rocm"])
def test_emulated_triton_backend_without_the_interpreter_says_how(tiny_llama, monkeypatch, device):
    """cuda / rocm emulated run Triton's interpreter, which TRITON_INTERPRET=1 turns on when the
    kernels are imported: without it, one sentence at start naming the variable (not Triton's
    "0 active drivers" at the first launch); the xpu emulation needs nothing."""
    from tessellm import LLM
    from tessellm.backends.registry import DeviceError, get_registry

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(DeviceError, match=f"Emulating '{device}' .* needs TRITON_INTERPRET=1 in "
                                          "the environment before the process starts"):
        LLM(tiny_llama, device=device, emulate=True, **ENGINE)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(DeviceError, match="TRITON_INTERPRET=1"):
        get_registry().select(device, emulate=True)
    assert get_registry().select("xpu", emulate=True).emulated
    monkeypatch.setenv("TRITON_INTERPRET", "true")  # Triton's other spellings of on count
    assert get_registry().select(device, emulate=True).emulated


def test_emulate_unknown_device_is_refused():
    from tessellm.backends.registry import DeviceError, get_registry

    with pytest.raises(DeviceError, match="Unknown device 'npu9'"):
        get_registry().select("npu9", emulate=True)


def test_emulated_tpu_runs_padded_steps_and_matches_cpu(tiny_llama):
    """The tpu kernel asks for bucketed steps (core/shape_buckets.py): on host tensors the runner
    pads every step as on XLA (tokens, sampled rows, block table) and the tokens stay the cpu's."""
    from tessellm import LLM

    engine = dict(dtype="float32", block_size=16, num_kv_blocks=32, max_model_len=128,
                  max_num_seqs=3, max_num_batched_tokens=32)
    prompts = [[1, 17, 33, 5], [2] + list(range(40, 80)), [3, 9]]  # one prompt is chunked
    with LLM(tiny_llama, device="cpu", **engine) as cpu:
        expected = greedy_tokens(cpu, prompts, 5)
    with LLM(tiny_llama, device="tpu", emulate=True, **engine) as tpu:
        runner = tpu.engine.core.runner
        assert runner.buckets is not None and runner.device.type == "cpu"
        got = greedy_tokens(tpu, prompts, 5)
    assert got == expected


def _unprefixed(caplog) -> bool:
    """A record logged now carries no ``[emulated ...]`` prefix."""
    with caplog.at_level(logging.INFO, logger="tessellm"):
        logging.getLogger("tessellm.test").info("after")
    return caplog.records[-1].getMessage() == "after"


def test_serve_emulate_marks_the_process_only_while_it_serves(tmp_path, caplog):
    """``tessellm serve --emulate`` marks its process; once run_serve returns (here: refused at
    start, a key file without its certificate) a later engine in the process logs unprefixed."""
    from tessellm.backends.emulation import emulated_names
    from tessellm.entrypoints.cli import build_parser
    from tessellm.entrypoints.serve import run_serve

    args = build_parser().parse_args(["serve", "m", "--device", "xpu", "--emulate",
                                      "--ssl-keyfile", str(tmp_path / "key.pem")])
    assert run_serve(args) == 2
    assert emulated_names() == [] and _unprefixed(caplog)


def test_emulated_engine_dropped_without_shutdown_unmarks(tiny_llama, caplog):
    """An emulated LLM never shut down (dropped, or its start raised) unmarks when collected."""
    import gc

    from tessellm import LLM
    from tessellm.backends.emulation import emulated_names

    llm = LLM(tiny_llama, device="xpu", emulate=True, **ENGINE)
    assert emulated_names() == ["xpu"]
    del llm
    gc.collect()
    assert emulated_names() == [] and _unprefixed(caplog)
