"""Shared fixtures: tiny random HF models saved as safetensors (built here, never downloaded)."""

from __future__ import annotations

import gc
import importlib.util
import os

import pytest

# As .ci/run does: without a GPU, Triton kernels run in the interpreter on CPU tensors. Set here,
# before any test module imports a kernel (TRITON_INTERPRET is read when @triton.jit decorates
# it), so a plain `pytest` (ci/matrix.yaml's cpu lane: the slow tests too) runs them as CI does.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

# The first engine-core process of the session sets these in this process's environment for
# good (``os.environ.setdefault``, core/engine_process.py), so every child started after it,
# worker ranks included, inherits them. Set from the start instead: every child of the session
# starts with the same import-time variables (OMP_* is one), so all of them are forked from one
# forkserver (distributed/spawn.py: a changed import state gets a new forkserver, seconds).
# torch first: its OpenMP runtime reads OMP_* once, when loaded; this process keeps its own.
import torch  # noqa: E402, F401

from tessellm import envs as _envs  # noqa: E402
from tessellm.loader.transformers_classes import TransformersTooOld, dtype_kwargs  # noqa: E402
from tests.xdist_scheduling import (SHARED_UNITS, keep_channel_out_of_forks, make_scheduler,  # noqa: E402
                                    read_unit_seconds)

# Time, not coverage: Triton's interpreter without re-patching triton.language at each nested
# jit call (tests/triton_interpreter.py); TESSELLM_TESTS_TRITON_REPATCH=1 keeps Triton's own.
if (_envs.triton_interpret() and os.environ.get("TESSELLM_TESTS_TRITON_REPATCH") != "1"
        and importlib.util.find_spec("triton") is not None):
    from tests.triton_interpreter import skip_nested_patching

    skip_nested_patching()

for _key, _value in _envs.engine_process_env_defaults().items():
    os.environ.setdefault(_key, _value)

# Time, not coverage: this process's torch runs on one thread for the tests outside
# tests/kernels and tests/backends. Their models are tiny (hidden sizes of 64 to 128, a few
# tokens a step): a second OpenMP thread buys nothing on ops that small and costs a fork-join
# and spinning at each of thousands of ops, against the engine cores, servers and ranks this
# process starts on the same two cores (tests/models on a busy 2-core machine: ~20-50% faster
# on one). The two directories that test the kernels themselves keep torch's count, so the
# cpu backend's native kernels (their work cut across ``torch.get_num_threads()`` threads) and
# the OpenMP ops run threaded there. Children keep their own count (worker.set_worker_threads;
# the server tests' children run with OMP_NUM_THREADS=1). TESSELLM_TESTS_THREADS=N sets
# another count for those tests, =0 leaves torch's (the default where torch has more than 4).
# Under pytest-xdist (.ci/run: two worker processes on CI's two cores), each worker takes its
# share of the cores for those two directories: a kernel test of one worker threaded across both
# cores would fight the other worker's test for them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_DEFAULT_THREADS = max(1, torch.get_num_threads() // _WORKERS)
_TEST_THREADS = (int(os.environ.get("TESSELLM_TESTS_THREADS", "1" if _DEFAULT_THREADS <= 4 else "0"))
                 or _DEFAULT_THREADS)
_KERNEL_DIRS = tuple(os.sep + os.path.join("tests", d) + os.sep for d in ("kernels", "backends"))


# The suite outside tests/kernels and the gpu-marked tests is the CPU suite: its engines leave
# ``device`` at "auto", which CI (no GPU) resolves to the cpu backend. Where a GPU is visible, auto
# would pick it (bf16 by default, CUDA graphs, compiled Triton) under tests written for the cpu
# backend's float32 results; so for them "auto" means cpu, as on CI. Tests in tests/kernels and
# gpu-marked tests keep the real auto (a test that names its device is never changed; nor an
# emulated one: emulate needs an explicit device; nor a test marked auto_device, about the
# default itself). Only this process: a test that starts a server or CLI as a child passes
# --device cpu. TESSELLM_TESTS_AUTO_CPU=1 applies this on a machine without a GPU too (to check
# it), =0 never.
_AUTO_CPU = {"1": True, "0": False}.get(os.environ.get("TESSELLM_TESTS_AUTO_CPU", ""),
                                        torch.cuda.is_available())
_auto_cpu_now = [False]  # for the test being set up (its module fixtures are built in its setup)
if _AUTO_CPU:
    from tessellm.config import EngineArgs as _EngineArgs

    _post_init = _EngineArgs.__post_init__

    def _auto_is_cpu_for_cpu_tests(self) -> None:
        _post_init(self)
        if _auto_cpu_now[0] and self.device == "auto" and not self.emulate:
            self.device = "cpu"

    _EngineArgs.__post_init__ = _auto_is_cpu_for_cpu_tests


def pytest_runtest_setup(item):
    """Where a GPU is visible, "auto" means the cpu backend for the CPU suite's engines (above).
    Torch's thread count for this test (``_TEST_THREADS`` above).

    ``@pytest.mark.interpreted``: the test runs Triton kernels on host tensors (an emulated
    cuda / rocm backend, or the kernels called on CPU tensors), which only Triton's interpreter
    can do. Where a GPU is visible, TRITON_INTERPRET stays unset (the kernels compile for the
    GPU), so such a test skips; the same kernels run on the GPU in tests/kernels and the
    ``gpu``-marked tests."""
    in_kernels = os.sep + os.path.join("tests", "kernels") + os.sep in str(item.path)
    threads = _DEFAULT_THREADS if any(d in str(item.path) for d in _KERNEL_DIRS) else _TEST_THREADS
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    _auto_cpu_now[0] = (_AUTO_CPU and not in_kernels and item.get_closest_marker("gpu") is None
                        and item.get_closest_marker("auto_device") is None)
    if item.get_closest_marker("interpreted") and not _envs.triton_interpret():
        pytest.skip("Triton kernels on host tensors (emulated cuda/rocm) need TRITON_INTERPRET=1; "
                    "with a GPU, tests/kernels and -m gpu run these kernels on the device")


@pytest.fixture(scope="module", autouse=True)
def _gc_skips_what_is_already_alive():
    """Time, not coverage: every ``LLM.shutdown`` runs ``gc.collect()`` (``worker.release``), a
    full collection that walks every object alive in this process, and here that is the whole
    session (torch, transformers and the HF model classes, every collected test module: ~500k
    objects, 0.3-0.5 s a collection on a 2-core machine), for each of hundreds of engines. At
    each module's start, what is still alive after a collection is frozen (``gc.freeze``): the
    collector no longer walks it; a collection looks only at what was made since. Frozen
    objects are still freed by reference counting; only a reference cycle among them that
    dies later stays in memory (a session's leftovers, not a test's)."""
    gc.collect()
    gc.freeze()
    yield


def pytest_terminal_summary(terminalreporter):
    """How this session's engine cores and workers were started (distributed/spawn.py): a
    plain spawn imports torch and tessellm again (seconds each), a new forkserver once per
    import state; the rest are forks."""
    import sys

    spawn = sys.modules.get("tessellm.distributed.spawn")
    if spawn is not None and spawn.counts:
        counts = spawn.counts
        terminalreporter.write_line(
            f"tessellm children of this process: {counts['forked']} forked, "
            f"{counts['forked_new']} by a new forkserver, {counts['spawned']} spawned")


# Test files that share a costly fixture run on one worker (SHARED_UNITS), the longest units
# first (tests/unit_seconds.json): tests/xdist_scheduling.py.
_UNIT_SECONDS = read_unit_seconds(os.path.join(os.path.dirname(__file__), "unit_seconds.json"))


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, which may not be installed
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` (.ci/run), with the files of each ``SHARED_UNITS`` entry as one
    unit: each test file runs whole on one worker (its module fixtures, an engine or a server,
    are built once), and the files of a shared unit all on the same one; the longest units
    first. A dead worker's running test fails once (tests/xdist_scheduling.py). Other modes
    are xdist's own."""
    return make_scheduler(config, log, SHARED_UNITS, _UNIT_SECONDS)


def pytest_configure(config):
    """In an xdist worker: its forked children (engine cores, forkservers) do not hold its pipe
    to the controller, so a worker killed (OOM) is seen dead at once, not when they exit
    (tests/xdist_scheduling.py)."""
    if hasattr(config, "workerinput"):
        keep_channel_out_of_forks(config)


def pytest_unconfigure(config):
    gc.unfreeze()  # the interpreter's last collections see everything again (nanobind's leak check)


TINY_COMMON = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


class _Built(dict):
    """name -> a config built when asked: a family newer than the installed transformers (Qwen3
    needs 4.51) fails only the tests that use it, with transformers_classes' clear error."""

    def __getitem__(self, name):
        return super().__getitem__(name)()


def _tiny_configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    from tessellm.loader.transformers_classes import transformers_class

    return _Built({
        "llama": lambda: LlamaConfig(**TINY_COMMON, tie_word_embeddings=False,
                                     rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 64}),
        "llama-tied": lambda: LlamaConfig(**TINY_COMMON, tie_word_embeddings=True),
        "mistral": lambda: MistralConfig(**TINY_COMMON, sliding_window=24, tie_word_embeddings=False),
        "qwen2": lambda: Qwen2Config(**TINY_COMMON, tie_word_embeddings=False, use_sliding_window=False),
        # Larger init: decisive logits, so greedy parity across devices is not decided by ties.
        "llama-sharp": lambda: LlamaConfig(**TINY_COMMON, tie_word_embeddings=False,
                                           initializer_range=0.25),
        "qwen3": lambda: transformers_class("Qwen3Config", "Qwen3")(
            **TINY_COMMON, head_dim=32, tie_word_embeddings=True, use_sliding_window=False),
    })


TINY_ARCHS = ["llama", "llama-tied", "mistral", "qwen2", "qwen3"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A function arch -> directory with config.json + model.safetensors (float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tiny-models")
    configs = _tiny_configs()
    made: dict[str, str] = {}

    def make(arch: str) -> str:
        if arch not in made:
            torch.manual_seed(1234)
            try:
                config = configs[arch]
            except TransformersTooOld as exc:  # e.g. qwen3 on the floor release (4.48)
                pytest.skip(str(exc))
            model = AutoModelForCausalLM.from_config(config, **dtype_kwargs(torch.float32))
            path = os.path.join(root, arch)
            model.save_pretrained(path)
            made[arch] = path
        return made[arch]

    return make


@pytest.fixture(scope="session")
def bundled_hf_model():
    """HF transformers' own load of the bundled SmolLM2 GGUF (dequantized by the ``gguf``
    package), float32: the oracle of tests/loader/test_gguf_loader.py (config, bit-identical
    weights) and tests/models/test_default_model.py (greedy tokens). Loaded once a session
    (~10 s on 2 cores; 0.5 GB held). Its generation config has no EOS, as our ``ignore_eos``:
    EOS may be chosen and never stops a generation."""
    import torch
    from transformers import AutoModelForCausalLM

    from tessellm.loader.default_model import default_model_path

    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              **dtype_kwargs(torch.float32))
    hf.generation_config.eos_token_id = None
    return hf


def hf_greedy(model_dir: str, prompts: list[list[int]], max_new_tokens: int,
              device: str = "cpu", dtype=None, attn_implementation=None) -> list[list[int]]:
    """Greedy tokens from HF transformers, one prompt at a time (no padding effects).

    Compare with our ``ignore_eos=True``: EOS may be chosen and does not stop. (HF's
    ``min_new_tokens`` would ban EOS instead, and differ wherever EOS is the greedy choice.)"""
    import torch
    from transformers import AutoModelForCausalLM

    attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
    hf = AutoModelForCausalLM.from_pretrained(model_dir, **dtype_kwargs(dtype or torch.float32),
                                              **attn).to(device)
    hf.generation_config.eos_token_id = None
    outs = []
    for p in prompts:
        prompt = torch.tensor([p], device=device)
        ids = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                          do_sample=False, pad_token_id=0)
        outs.append(ids[0, len(p):].tolist())
    return outs
