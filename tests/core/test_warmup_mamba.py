"""The warm-up of a model with Mamba layers leaves no Mamba kernel variant to compile: every
Triton specialisation of the conv1d, conv state, SSD scan kernels (and the sequential scan of
short chunks) and state update launches that real requests of other lengths then hit was
launched during the warm-up already.

The cuda backend runs emulated (Triton's interpreter on the CPU), so nothing compiles here;
each launch's specialisation key is computed the way Triton's JIT forms it (constexprs, each
int argument as 1 / a multiple of 16 / other, each tensor's dtype and 16-byte alignment) by a
spy that forwards every launch to the real kernel."""

from __future__ import annotations

import inspect
import os
from types import SimpleNamespace

import pytest
import torch

from tessellm import LLM, SamplingParams
from tessellm.core import warmup
from tessellm.kernels.mamba import chunk_scan, conv1d, ssd, state_update
from tests.models.test_mamba2 import mamba2_config
from tests.models.variant_parity import save_tiny

KERNELS = [(conv1d, "_conv_kernel"),
           (ssd, "_dt_cumsum"), (ssd, "_chunk_cb"), (ssd, "_chunk_states"),
           (ssd, "_state_passing"), (ssd, "_chunk_output"), (state_update, "_state_update_kernel"),
           (chunk_scan, "_chunk_scan_kernel")]  # the sequential scan: chunks under SSD_MIN_TOKENS
# int arguments the kernels declare ``do_not_specialize`` (one variant for every value)
UNSPECIALIZED = {"nc"}


@pytest.fixture(autouse=True)
def _ssd_scan_on(monkeypatch):
    """With the parallel SSD prefill kernels on (``envs.ssd_scan``, the default), the warm-up
    must compile them (KERNELS)."""
    monkeypatch.setenv("TESSELLM_SSD_SCAN", "1")


def _spec(value):
    if isinstance(value, torch.Tensor):
        return (str(value.dtype), value.data_ptr() % 16 == 0)
    if isinstance(value, bool) or not isinstance(value, int):
        return type(value).__name__
    return ("int", value == 1, value % 16 == 0)


class _Spy:
    """Stands in for ``kernel`` at its module's name: ``spy[grid](...)`` records the launch's
    specialisation key in ``seen`` and launches the real kernel."""

    def __init__(self, name, kernel, seen):
        self.name, self.kernel, self.seen = name, kernel, seen
        self.args = list(inspect.signature(kernel.fn).parameters)

    def __getitem__(self, grid):
        def launch(*args, **constexprs):
            key = tuple("any" if n in UNSPECIALIZED else _spec(a) for n, a in zip(self.args, args))
            self.seen.add((self.name, key, tuple(sorted(constexprs.items()))))
            return self.kernel[grid](*args, **constexprs)
        return launch


def _as_gpu(core):
    """The core as ``warmup.plan_for`` sees it, on a GPU: emulated, the backend's device type
    is the CPU's, whose plan is one short request."""
    return SimpleNamespace(scheduler=core.scheduler, info=core.info, vocab_size=core.vocab_size,
                           max_model_len=core.max_model_len,
                           backend=SimpleNamespace(device_type="cuda"))


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
def test_warmup_launches_every_mamba_kernel_variant_requests_hit(tmp_path, monkeypatch):
    seen: set = set()
    # the tiny engine's budget (64 tokens) under the SSD's threshold (192): its whole-budget
    # chunk takes the SSD kernels as a serving engine's (budget 2048+) does
    monkeypatch.setattr(chunk_scan, "SSD_MIN_TOKENS", 64)
    for module, name in KERNELS:
        monkeypatch.setattr(module, name, _Spy(name, getattr(module, name), seen))
    path = save_tiny(mamba2_config(), str(tmp_path / "mamba2"))
    with LLM(path, device="cuda", emulate=True, dtype="float32", max_num_batched_tokens=64,
             max_num_seqs=4, max_model_len=96) as llm:
        core = llm.engine.core
        seen.clear()
        assert warmup.run(core, warmup.plan_for(_as_gpu(core))).requests > 0
        warm = set(seen)
        assert {key[0] for key in warm} == {name for _, name in KERNELS}
        seen.clear()
        params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        lengths = [2, 3, 5, 7, 12, 26, 40]  # prompts the warm-up's lengths do not name
        for n in lengths:  # each alone, then all at once (mixed steps, chunked prefill)
            llm.generate([{"prompt_token_ids": list(range(3, 3 + n))}], params, use_tqdm=False)
        llm.generate([{"prompt_token_ids": list(range(5, 5 + n))} for n in lengths], params,
                     use_tqdm=False)
    assert seen, "the requests ran no Mamba kernel"
    missed = sorted(seen - warm)
    assert not missed, f"variants first launched after the warm-up: {missed}"
