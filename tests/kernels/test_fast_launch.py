"""``kernels/launch.FastLaunch`` (Triton launches without ``JITFunction.run``'s binding on a
hit) hands the compiled kernel's launcher exactly what Triton's own path hands it: the same
compiled kernel (Triton's choice for those arguments: a pointer's alignment, an int of 1 or a
multiple of 16, a bool for an int, another dtype or constexpr each pick their own) and the
same grid, stream, function, metadata, hooks and arguments. Run on the CPU through Triton's
real binder and cache keys, with a stand-in driver (device 0, a stream id, an sm_90 target)
and compiled kernels that record their launches instead of compiling: no GPU, no interpreter.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from tessellm.kernels import launch  # noqa: E402


def _body(x_ptr, y_ptr, n, scale, flag, stride, BLOCK: tl.constexpr, MODE: tl.constexpr):
    pass  # never compiled here


class _Driver:
    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 77

    def get_current_target(self):
        return self.target


class _Compiled:
    """A compiled kernel's stand-in: one per Triton cache key, recording its launches."""

    def __init__(self, key, log):
        self.key, self.log = key, log
        self.function = f"function of {key}"
        self.packed_metadata = ("packed", key)

    def launch_metadata(self, grid, stream, *args):
        return ("metadata", tuple(grid), stream, args)

    def run(self, *args):
        self.log.append((self, args))


def _setup(monkeypatch, target):
    if not launch._run_launches_as_expected():
        pytest.skip("this Triton's JITFunction.run launches otherwise: FastLaunch stays off")
    log, runs = [], []
    monkeypatch.setattr(driver, "_active", _Driver(target))
    monkeypatch.setattr(launch, "ENABLED", True)

    def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        compiled = self.device_caches[device][0][key] = _Compiled(key, log)
        return compiled

    run = JITFunction.run

    def counted(self, *args, **kwargs):
        runs.append(1)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(JITFunction, "_do_compile", do_compile)
    monkeypatch.setattr(JITFunction, "run", counted)
    return JITFunction(_body), log, runs


def _variants():
    g = torch.zeros(64, dtype=torch.float32)
    h = torch.zeros(64, dtype=torch.float16)
    base = ((g, g), (8, 0.5, 3, 64), {"BLOCK": 32, "MODE": 0})
    yield base
    yield base  # seen: a hit
    yield (g, h), base[1], base[2]  # another dtype
    yield (g, g[1:]), base[1], base[2]  # a pointer 4 bytes off 16: Triton's own path
    yield base[0], (1, 0.5, 3, 64), base[2]  # n == 1: Triton makes it a constant
    yield base[0], (16, 0.5, 3, 64), base[2]  # n % 16 == 0
    yield base[0], (8, 1.0, 1, 64), base[2]
    yield base[0], (8, 1.0, True, 64), base[2]  # a bool where an int of the same value was
    yield base[0], (8, 1, 1, 64), base[2]  # an int where a float of the same value was
    yield base[0], (8, 0.25, 3, 64), base[2]  # another float: the same compiled kernel
    yield base[0], base[1], {"BLOCK": 64, "MODE": 0}
    yield base[0], base[1], {"BLOCK": 32, "MODE": 0, "num_warps": 8}
    yield base  # all seen again
    yield base[0], (16, 0.5, 3, 64), base[2]
    yield (g, g[1:]), base[1], base[2]


def test_fast_launch_hands_the_launcher_what_triton_does(monkeypatch):
    kernel, log, runs = _setup(monkeypatch, GPUTarget("cuda", 90, 32))
    fast = launch.FastLaunch(kernel)
    grid = (3, 2)
    seen, hits = set(), 0
    for tensors, scalars, meta in _variants():
        key = (tuple((t.dtype, t.data_ptr() % 16) for t in tensors), tuple(map(type, scalars)),
               scalars, tuple(meta.items()))
        del log[:], runs[:]
        kernel[grid](*tensors, *scalars, **meta)  # Triton's own path
        (want,) = log
        del log[:], runs[:]
        fast(grid, tensors, scalars, meta)
        (got,) = log
        assert got[0] is want[0], f"{key}: another compiled kernel than Triton's"
        assert got[1] == want[1], f"{key}: the launcher got other arguments"
        aligned = all(t.data_ptr() % 16 == 0 for t in tensors)
        if key in seen and aligned:
            assert not runs, f"{key}: seen before, yet Triton's run() was called"
            hits += 1
        else:
            assert runs, f"{key}: not seen (or misaligned), so Triton's path must launch it"
        seen.add(key)
    assert hits == 3
    kernels = {id(c) for c, _ in fast.kept.values()}
    assert len(kernels) == len(fast.kept) - 1  # two floats for the same compiled kernel


def test_fast_launch_keeps_nothing_where_the_backend_specializes_more(monkeypatch):
    """ROCm's backend also specializes a tensor on its extent (buffer ops): every launch goes
    through Triton's own path there."""
    pytest.importorskip("triton.backends.amd.compiler")
    kernel, log, runs = _setup(monkeypatch, GPUTarget("hip", "gfx942", 64))
    fast = launch.FastLaunch(kernel)
    g = torch.zeros(64)
    for _ in range(3):
        del runs[:]
        fast((1,), (g, g), (8, 0.5, 3, 64), {"BLOCK": 32, "MODE": 0})
        assert runs and len(log) == 1
        del log[:]
    assert not fast.kept


def test_fast_launch_steps_aside_for_a_pre_run_hook(monkeypatch):
    kernel, log, runs = _setup(monkeypatch, GPUTarget("cuda", 90, 32))
    fast = launch.FastLaunch(kernel)
    g = torch.zeros(64)
    args = ((1,), (g, g), (8, 0.5, 3, 64), {"BLOCK": 32, "MODE": 0})
    fast(*args)
    hooked = []
    kernel.add_pre_run_hook(lambda *a, **k: hooked.append(1))
    del runs[:]
    fast(*args)
    assert runs and hooked


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fast_launch_results_match_on_the_gpu():
    """On a GPU: the gated RMSNorm and the sequential Mamba scan, launched many times (the
    first through Triton's path, the rest through the kept kernels; a row view 4 bytes off
    alignment through Triton's again), give the reference's results every time."""
    from tessellm.backends.reference.gated_norm import gated_rms_norm as reference
    from tessellm.backends.reference.mamba import ssd_chunk_scan
    from tessellm.core.mamba_state import make_batch
    from tessellm.kernels.gated_norm import _gated_launch, gated_rms_norm
    from tessellm.kernels.mamba.chunk_scan import _scan_launch, sequential_chunk_scan

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    for i in range(6):
        y = torch.randn(9, 65 if i % 3 == 2 else 64, device=dev, generator=g)
        z = torch.randn(9, y.shape[1], device=dev, generator=g)
        y, z = y[:, -64:], z[:, -64:]  # i % 3 == 2: rows 4 bytes off 16
        w = torch.randn(64, device=dev, generator=g)
        torch.testing.assert_close(gated_rms_norm(y, z, w, 32, 1e-5),
                                   reference(y, z, w, 32, 1e-5), atol=1e-5, rtol=1e-5)
    T, H, P, G, N = 40, 2, 16, 1, 16
    for i in range(4):
        x, dt = torch.randn(T, H, P, device=dev), torch.randn(T, H, device=dev) - 1.0
        B, C = torch.randn(T, G, N, device=dev), torch.randn(T, G, N, device=dev)
        A, D = -torch.rand(H, device=dev) - 0.1, torch.randn(H, device=dev)
        dt_bias = torch.randn(H, device=dev) * 0.5
        state = torch.randn(3, H, P, N, device=dev) * 0.3
        want_state = state.cpu().clone()
        want = ssd_chunk_scan(x.cpu(), dt.cpu(), A.cpu(), B.cpu(), C.cpu(), D.cpu(),
                              dt_bias.cpu(), want_state, make_batch([15, 25], [2, 0],
                                                                    torch.device("cpu")), 8)
        got = sequential_chunk_scan(x, dt, A, B, C, D, dt_bias, state,
                                    make_batch([15, 25], [2, 0], dev))
        torch.testing.assert_close(got.cpu(), want, atol=2e-4, rtol=2e-4)
        torch.testing.assert_close(state.cpu(), want_state, atol=2e-4, rtol=2e-4)
    if launch.ENABLED:
        assert _gated_launch.kept and _scan_launch.kept


@pytest.mark.parametrize("value", ["1", "true", "On", "yes"])
def test_fast_launch_stays_off_under_the_interpreter(monkeypatch, value):
    """Every spelling of TRITON_INTERPRET that Triton reads as on (``envs.triton_interpret``,
    the one place it is read) keeps FastLaunch off, even when asked for."""
    from tessellm import envs

    monkeypatch.setenv("TESSELLM_TRITON_FAST_LAUNCH", "1")
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert envs.triton_interpret()
    assert not launch._enabled()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not envs.triton_interpret()
