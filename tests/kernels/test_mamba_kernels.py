"""The Triton Mamba2 kernels (``kernels/mamba``: the causal conv1d with per-request state, the
single-token state update, the chunked SSD scan: its parallel kernels and the sequential
fallback) against the pure-torch reference ops on the CPU, at tiny sizes (the kernels on the GPU
where there is one, else through the Triton interpreter on the CPU): mixed steps of decodes and
prefill chunks shorter and longer than the conv window, non-consecutive state slots, sizes that
are not powers of two, float32 and float16, and the strided views the mixer passes (x, B and C
column slices of the conv's output)."""

from __future__ import annotations

import json

import pytest
import torch

from tessellm.backends.reference import mamba as ref
from tessellm.core.mamba_state import make_batch
from tessellm.kernels.mamba import mamba_conv1d, mamba_state_update
from tests.kernels.offline_compile import run_compile_script

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _ssd_scan_on(monkeypatch):
    """The parallel SSD prefill kernels (``envs.ssd_scan``, the default) are what these tests
    check; the sequential kernel (TESSELLM_SSD_SCAN=0) has its fallback case."""
    monkeypatch.setenv("TESSELLM_SSD_SCAN", "1")


def _on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lengths,width", [([1, 1, 2, 9], 4), ([1, 3, 17], 3)])
def test_conv1d_matches_reference(dtype, lengths, width):
    g = torch.Generator().manual_seed(len(lengths) + width)
    channels, slots = 40, [4, 0, 2, 5][:len(lengths)]
    x = torch.randn(sum(lengths), channels, generator=g).to(dtype)
    weight = torch.randn(channels, width, generator=g).to(dtype)
    bias = torch.randn(channels, generator=g).to(dtype)
    state = torch.randn(6, channels, width - 1, generator=g).to(dtype)
    batch = make_batch(lengths, slots, torch.device("cpu"))
    dev_batch = make_batch(lengths, slots, DEVICE)
    for b in (bias, None):
        want_state, got_state = state.clone(), state.clone().to(DEVICE)
        want = ref.causal_conv1d(x, weight, b, want_state, batch)
        got = mamba_conv1d(*_on_device(x, weight), b if b is None else b.to(DEVICE), got_state,
                           dev_batch)
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-3, rtol=5e-3)
        torch.testing.assert_close(got.cpu(), want, **tol)
        torch.testing.assert_close(got_state.cpu(), want_state, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dt_limit", [(0.0, float("inf")), (0.05, 0.5)])
def test_state_update_matches_reference(dtype, dt_limit):
    g = torch.Generator().manual_seed(7)
    S, H, P, G, N = 3, 6, 12, 2, 10  # P and N not powers of two
    x = torch.randn(S, H, P, generator=g).to(dtype)
    dt = (torch.randn(S, H, generator=g) * 3).to(dtype)
    dt[0, 0] = 25.0  # past softplus's threshold (20): its linear branch
    B, C = (torch.randn(S, G, N, generator=g).to(dtype) for _ in range(2))
    A = -torch.rand(H, generator=g) - 0.1
    D, dt_bias = torch.randn(H, generator=g), torch.randn(H, generator=g)
    state = torch.randn(5, H, P, N, generator=g).to(dtype)
    idx = torch.tensor([3, 0, 4], dtype=torch.int32)
    want_state, got_state = state.clone(), state.clone().to(DEVICE)
    want = ref.selective_state_update(x, dt, A, B, C, D, dt_bias, want_state, idx, dt_limit)
    got = mamba_state_update(*_on_device(x, dt, A, B, C, D, dt_bias), got_state, idx.to(DEVICE),
                             dt_limit)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got.cpu(), want, **tol)
    torch.testing.assert_close(got_state.cpu(), want_state, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dt_limit", [(0.0, float("inf")), (0.05, 0.5)])
def test_chunk_scan_matches_reference(dtype, dt_limit):
    """Sequences shorter than the kernel's chunk, across several of its chunks and across the
    reference's (8 tokens), each from an earlier state in its slot."""
    from tessellm.kernels.mamba.chunk_scan import mamba_chunk_scan

    g = torch.Generator().manual_seed(11)
    lengths, slots = [1, 5, 33, 70], [3, 0, 5, 1]
    T, H, P, G, N = sum(lengths), 4, 12, 2, 10
    x = torch.randn(T, H, P, generator=g).to(dtype)
    dt = (torch.randn(T, H, generator=g) - 1.0).to(dtype)
    B, C = (torch.randn(T, G, N, generator=g).to(dtype) for _ in range(2))
    A = -torch.rand(H, generator=g) - 0.1
    D, dt_bias = torch.randn(H, generator=g), torch.randn(H, generator=g) * 0.5
    state = (torch.randn(6, H, P, N, generator=g) * 0.3).to(dtype)
    batch = make_batch(lengths, slots, torch.device("cpu"))
    want_state, got_state = state.clone(), state.clone().to(DEVICE)
    want = ref.ssd_chunk_scan(x, dt, A, B, C, D, dt_bias, want_state, batch, 8, dt_limit)
    got = mamba_chunk_scan(*_on_device(x, dt, A, B, C, D, dt_bias), got_state,
                           make_batch(lengths, slots, DEVICE), 8, dt_limit)
    tol = dict(atol=2e-4, rtol=2e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.cpu(), want, **tol)
    torch.testing.assert_close(got_state.cpu(), want_state, **tol)


@pytest.mark.parametrize("dtype,groups",
                         [(torch.float32, 2), (torch.float32, 1), (torch.float16, 1)])
def test_ssd_kernels_over_many_chunks_match_reference(dtype, groups):
    """The parallel SSD kernels (``kernels/mamba/ssd.py``) with 16-token chunks, so tiny
    sequences span several: a sequence inside one chunk, one ending on a chunk boundary, longer
    ones ending inside a chunk, from earlier states (one fresh), heads sharing B and C; the
    state passing over chunks and the slots the step does not name (left alone)."""
    from tessellm.kernels.mamba.ssd import ssd_chunk_scan

    g = torch.Generator().manual_seed(5)
    lengths, slots = [7, 48, 21, 70], [3, 0, 6, 1]
    T, H, P, N = sum(lengths), 4, 12, 10
    x = torch.randn(T, H, P, generator=g).to(dtype)
    dt = (torch.randn(T, H, generator=g) - 1.0).to(dtype)
    B, C = (torch.randn(T, groups, N, generator=g).to(dtype) for _ in range(2))
    A = -torch.rand(H, generator=g) * 0.5 - 0.05
    D, dt_bias = torch.randn(H, generator=g), torch.randn(H, generator=g) * 0.5
    state = (torch.randn(7, H, P, N, generator=g) * 0.3).to(dtype)
    state[0] = 0.0
    batch = make_batch(lengths, slots, torch.device("cpu"))
    want_state, got_state = state.clone(), state.clone().to(DEVICE)
    want = ref.ssd_chunk_scan(x, dt, A, B, C, D, dt_bias, want_state, batch, 8)
    got = ssd_chunk_scan(*_on_device(x, dt, A, B, C, D, dt_bias), got_state,
                         make_batch(lengths, slots, DEVICE), chunk=16)
    tol = dict(atol=2e-4, rtol=2e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.cpu(), want, **tol)
    torch.testing.assert_close(got_state.cpu(), want_state, **tol)
    torch.testing.assert_close(got_state.cpu()[[2, 4, 5]], state[[2, 4, 5]])


def test_ssd_chunking_lives_with_its_batch():
    """The SSD scan's per-step chunking is made once per ``MambaBatch`` (every Mamba layer of a
    step scans the same batch) and kept on that batch: nothing in the module holds a step's
    batch (and its device tensors) after the step, e.g. past an engine's shutdown."""
    import gc
    import weakref

    from tessellm.kernels.mamba import ssd

    g = torch.Generator().manual_seed(1)
    T, H, P, N = 20, 2, 4, 8
    x, dt = torch.randn(T, H, P, generator=g), torch.randn(T, H, generator=g) - 1.0
    B, C = (torch.randn(T, 1, N, generator=g) for _ in range(2))
    A, D, dt_bias = -torch.rand(H, generator=g) - 0.1, torch.randn(H, generator=g), torch.zeros(H)
    state = torch.zeros(3, H, P, N)
    batch = make_batch([5, 15], [2, 0], DEVICE)
    args = _on_device(x, dt, A, B, C, D, dt_bias)
    first = ssd.ssd_chunk_scan(*args, state.clone().to(DEVICE), batch, chunk=16)
    made = ssd._chunks(batch, 16)
    assert ssd._chunks(batch, 16) is made  # once a step, for every layer
    again = ssd.ssd_chunk_scan(*args, state.clone().to(DEVICE), batch, chunk=16)
    torch.testing.assert_close(again, first)
    gone = weakref.ref(batch)
    del batch
    gc.collect()
    assert gone() is None


def test_ssd_chunking_follows_the_batch_contents():
    """The SSD kernels' chunking, built once for a step's layers, is rebuilt when a batch object
    is reused with other sequence lengths (its host and device lists rewritten in place)."""
    from tessellm.kernels.mamba.ssd import ssd_chunk_scan

    g = torch.Generator().manual_seed(7)
    T, H, P, G, N = 70, 2, 8, 1, 16
    x, dt = torch.randn(T, H, P, generator=g), torch.randn(T, H, generator=g) - 1.0
    B, C = (torch.randn(T, G, N, generator=g) for _ in range(2))
    A, D, dt_bias = -torch.rand(H, generator=g) - 0.1, torch.randn(H, generator=g), torch.zeros(H)
    args = _on_device(x, dt, A, B, C, D, dt_bias)
    batch = make_batch([40, 30], [0, 1], DEVICE)
    ssd_chunk_scan(*args, torch.zeros(2, H, P, N, device=DEVICE), batch, chunk=16)
    batch.query_start_loc_host[:] = [0, 20, 70]
    batch.query_start_loc.copy_(torch.tensor([0, 20, 70], dtype=torch.int32))
    want_state, got_state = torch.zeros(2, H, P, N), torch.zeros(2, H, P, N, device=DEVICE)
    want = ref.ssd_chunk_scan(x, dt, A, B, C, D, dt_bias, want_state,
                              make_batch([20, 50], [0, 1], torch.device("cpu")), 8)
    got = ssd_chunk_scan(*args, got_state, batch, chunk=16)
    torch.testing.assert_close(got.cpu(), want, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(got_state.cpu(), want_state, atol=2e-4, rtol=2e-4)


_COMPILE_SSD = """
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tessellm.kernels.mamba import ssd

H, P, N = 128, 64, 128  # Granite 4.0-H small's heads (Mamba2-2.7B: the same but 80 heads)
MODEL = {"x_ptr", "dt_ptr", "b_ptr", "c_ptr", "d_ptr", "bias_ptr", "y_ptr", "state_ptr"}
done = []
for dt, prec in (("bf16", "tf32"), ("fp32", "tf32x3")):
    for name, cfg in ssd.launch_configs(H, P, N, ssd.CHUNK, prec, clamp=True).items():
        fn, consts = getattr(ssd, name), dict(cfg)
        warps = consts.pop("num_warps", 4)
        sig = {}
        for arg in fn.arg_names:
            if arg in consts:
                sig[arg] = "constexpr"
            elif arg in MODEL:
                sig[arg] = "*" + dt
            elif arg.endswith("_ptr"):  # the step's indices, the scratch (float32), A
                sig[arg] = "*i32" if arg.startswith(("meta", "idx", "seq")) else "*fp32"
            else:
                sig[arg] = "fp32" if arg.startswith("dt_") else "i32"
        src = ASTSource(fn=fn, signature=sig, constexprs=consts)
        asm = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                             options=dict(num_warps=warps)).asm
        done.append([name, dt, "cubin" in asm])
print("RESULT" + json.dumps(done))
"""


def test_ssd_kernels_compile_for_sm90():
    """Each SSD kernel with the constexprs and warps its launch passes (``launch_configs``),
    compiled for an H100 (offline, no GPU), for 16-bit (TF32 products) and float32 models
    (tf32x3): the compiled form the interpreter tests cannot show."""
    proc = run_compile_script(_COMPILE_SSD)
    assert proc.returncode == 0 and "RESULT" in proc.stdout, proc.stderr[-3000:]
    done = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert len(done) == 10 and all(ok for _, _, ok in done), done


_COMPILE_SEQUENTIAL = """
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tessellm.kernels.mamba import chunk_scan

fn = chunk_scan._chunk_scan_kernel
MODEL = {"x_ptr", "dt_ptr", "b_ptr", "c_ptr", "d_ptr", "dt_bias_ptr", "y_ptr", "state_ptr",
         "snap_ptr"}
done = []
for dt in ("bf16",):
    for saves in (False, True):
        block_p, warps = chunk_scan.sequential_config(64, 128)  # what its launch passes
        consts = dict(CLAMP=True, SAVES=saves, Q=32, BLOCK_P=block_p, BLOCK_N=128)
        sig = {}
        for arg in fn.arg_names:
            if arg in consts:
                sig[arg] = "constexpr"
            elif arg in MODEL:
                sig[arg] = "*" + dt
            elif arg.endswith("_ptr"):
                sig[arg] = "*fp32" if arg == "a_ptr" else "*i32"
            else:
                sig[arg] = "fp32" if arg.startswith("dt_") else "i32"
        src = ASTSource(fn=fn, signature=sig, constexprs=consts)
        asm = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                             options=dict(num_warps=warps)).asm
        done.append([dt, saves, "cubin" in asm])
# the gated delta rule's chunk kernel (Qwen3-Next's 128 x 128 heads), with and without saves
from tessellm.kernels.gated_delta import chunk
fn = chunk._chunk_kernel
block_v, warps = chunk.chunk_config(128, 128)  # what its launch passes
for saves in (False, True):
    consts = dict(SAVES=saves, Q=32, BLOCK_K=128, BLOCK_V=block_v)
    sig = {}
    for arg in fn.arg_names:
        if arg in consts:
            sig[arg] = "constexpr"
        elif arg in ("qsl_ptr", "idx_ptr") or arg.startswith("save_"):
            sig[arg] = "*i32"
        elif arg.endswith("_ptr"):
            sig[arg] = "*bf16"
        else:
            sig[arg] = "fp32" if arg in ("scale", "eps") else "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    asm = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options=dict(num_warps=warps)).asm
    done.append(["delta", saves, "cubin" in asm])
print("RESULT" + json.dumps(done))
"""


def test_sequential_scan_compiles_for_sm90():
    """The sequential scan kernel and the gated delta rule's chunk kernel, with and without
    their in-pass state saves (the ``while`` walk to each save offset), compiled for an H100
    (offline, no GPU) at Granite 4.0-H's and Qwen3-Next's head sizes with the tiles and warps
    their launches pass (``sequential_config``, ``chunk_config``): the compiled form the
    interpreter tests cannot show."""
    proc = run_compile_script(_COMPILE_SEQUENTIAL)
    assert proc.returncode == 0 and "RESULT" in proc.stdout, proc.stderr[-3000:]
    done = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert len(done) == 4 and all(ok for *_, ok in done), done


def test_sequential_scan_fallback_matches_reference(monkeypatch):
    """Where the SSD kernels' scratch would pass ``SSD_SCRATCH_LIMIT``, ``mamba_chunk_scan``
    runs the sequential kernel: the same outputs and states."""
    from tessellm.kernels.mamba import chunk_scan, ssd

    def refuse(*args, **kwargs):
        raise AssertionError("the SSD kernels ran past the scratch limit")

    monkeypatch.setattr(chunk_scan, "SSD_SCRATCH_LIMIT", 0)
    monkeypatch.setattr(ssd, "ssd_chunk_scan", refuse)
    g = torch.Generator().manual_seed(6)
    lengths, slots = [5, chunk_scan.SSD_MIN_TOKENS + 6], [2, 0]  # long enough for the SSD
    T, H, P, G, N = sum(lengths), 2, 8, 1, 16
    x, dt = torch.randn(T, H, P, generator=g), torch.randn(T, H, generator=g) - 1.0
    B, C = (torch.randn(T, G, N, generator=g) for _ in range(2))
    A, D, dt_bias = -torch.rand(H, generator=g) - 0.1, torch.randn(H, generator=g), torch.zeros(H)
    state = torch.randn(3, H, P, N, generator=g) * 0.3
    want_state, got_state = state.clone(), state.clone().to(DEVICE)
    want = ref.ssd_chunk_scan(x, dt, A, B, C, D, dt_bias, want_state,
                              make_batch(lengths, slots, torch.device("cpu")), 8)
    got = chunk_scan.mamba_chunk_scan(*_on_device(x, dt, A, B, C, D, dt_bias), got_state,
                                      make_batch(lengths, slots, DEVICE), 8)
    torch.testing.assert_close(got.cpu(), want, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(got_state.cpu(), want_state, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("lengths", [[1, 9, 40], [63, 2]])
def test_short_chunks_take_the_sequential_scan(monkeypatch, lengths):
    """With the SSD kernels on, a step whose longest prefill sequence is under
    ``SSD_MIN_TOKENS`` (cached-prefix tails, decode-sized mixed steps) runs the sequential
    kernel (one launch, not five): the reference's outputs and states; one sequence at the
    threshold takes the SSD kernels again."""
    from tessellm.kernels.mamba import chunk_scan, ssd

    assert chunk_scan.SSD_MIN_TOKENS > max(lengths)
    H, P, G, N = 2, 8, 1, 16
    assert not chunk_scan.use_ssd(make_batch(lengths, [0] * len(lengths), DEVICE), H, P, N)
    assert chunk_scan.use_ssd(make_batch(lengths + [chunk_scan.SSD_MIN_TOKENS],
                                         [0] * (len(lengths) + 1), DEVICE), H, P, N)
    monkeypatch.setenv("TESSELLM_SSD_SCAN", "0")
    assert not chunk_scan.use_ssd(make_batch([chunk_scan.SSD_MIN_TOKENS], [0], DEVICE), H, P, N)
    monkeypatch.setenv("TESSELLM_SSD_SCAN", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("the SSD kernels ran on short chunks")

    monkeypatch.setattr(ssd, "ssd_chunk_scan", refuse)
    g = torch.Generator().manual_seed(8)
    slots = [3, 0, 1][:len(lengths)]
    T = sum(lengths)
    x, dt = torch.randn(T, H, P, generator=g), torch.randn(T, H, generator=g) - 1.0
    B, C = (torch.randn(T, G, N, generator=g) for _ in range(2))
    A, D = -torch.rand(H, generator=g) - 0.1, torch.randn(H, generator=g)
    dt_bias = torch.randn(H, generator=g) * 0.5
    state = torch.randn(4, H, P, N, generator=g) * 0.3
    want_state, got_state = state.clone(), state.clone().to(DEVICE)
    want = ref.ssd_chunk_scan(x, dt, A, B, C, D, dt_bias, want_state,
                              make_batch(lengths, slots, torch.device("cpu")), 8)
    got = chunk_scan.mamba_chunk_scan(*_on_device(x, dt, A, B, C, D, dt_bias), got_state,
                                      make_batch(lengths, slots, DEVICE), 8)
    torch.testing.assert_close(got.cpu(), want, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(got_state.cpu(), want_state, atol=2e-4, rtol=2e-4)


def test_mixer_step_on_strided_views_matches_reference():
    """One step as ``MambaMixer2.forward`` runs it, at the tiny families' sizes (H 8, P 16,
    G 2, N 16, conv width 4): the conv over ``xbc`` (rows of I + 2GN channels), then the state
    update of the decodes and the scan of the prefill chunks on x, B and C as column views of
    the conv's output (row stride I + 2GN, not contiguous) from states left by earlier tokens.
    float32 to 1e-4: a kernel whose products drop to TF32 on a GPU fails it."""
    from tessellm.kernels.mamba.chunk_scan import mamba_chunk_scan

    g = torch.Generator().manual_seed(3)
    lengths, slots = [1, 1, 4, 21, 40, 70], [6, 2, 0, 5, 1, 3]
    H, P, G, N, K = 8, 16, 2, 16, 4
    T, inner, conv_dim = sum(lengths), H * P, H * P + 2 * G * N
    xbc = torch.randn(T, conv_dim, generator=g)
    weight, bias = torch.randn(conv_dim, K, generator=g) * 0.5, torch.randn(conv_dim, generator=g)
    dt = torch.randn(T, H, generator=g) - 1.0
    A = -torch.rand(H, generator=g) * 4 - 0.5
    D, dt_bias = torch.randn(H, generator=g), torch.randn(H, generator=g) * 0.5
    conv_state = torch.randn(7, conv_dim, K - 1, generator=g)
    ssm_state = torch.randn(7, H, P, N, generator=g) * 0.5

    def step(conv, scan, update, device, conv_state, ssm_state):
        batch = make_batch(lengths, slots, device)
        out = conv(xbc.to(device), weight.to(device), bias.to(device), conv_state, batch)
        x, B, C = out.split([inner, G * N, G * N], dim=-1)
        x, B, C = x.reshape(T, H, P), B.reshape(T, G, N), C.reshape(T, G, N)
        assert not x.is_contiguous()
        params = [t.to(device) for t in (A, D, dt_bias)]
        nd, dtd = batch.num_decodes, dt.to(device)
        y_dec = update(x[:nd], dtd[:nd], params[0], B[:nd], C[:nd], *params[1:], ssm_state,
                       batch.state_indices[:nd])
        y_pre = scan(x[nd:], dtd[nd:], params[0], B[nd:], C[nd:], *params[1:], ssm_state,
                     batch.prefills, 8)
        return torch.cat([y_dec, y_pre]).cpu(), conv_state.cpu(), ssm_state.cpu()

    want = step(ref.causal_conv1d, ref.ssd_chunk_scan, ref.selective_state_update,
                torch.device("cpu"), conv_state.clone(), ssm_state.clone())
    got = step(mamba_conv1d, mamba_chunk_scan, mamba_state_update, DEVICE,
               conv_state.clone().to(DEVICE), ssm_state.clone().to(DEVICE))
    for name, a, b in zip(("y", "conv_state", "ssm_state"), got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
