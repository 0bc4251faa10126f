"""Host time of a hybrid model's eager prefill step after a recurrent-state prefix hit, and
the torch ops it runs per layer: random weights, token ids fed (the models of
``recurrent_state_graphs.py``; ``--tiny`` shrinks their widths to 64 for the CPU, where the
op path is the same shared mixer code around the backend's ops).

Per model an engine starts with prefix caching on; prompt A (``--input-len`` tokens) is
answered with one token, then B = A + ``--suffix`` tokens: B starts from A's snapshot and
computes its ``suffix`` (+ A's tail past its last full block) tokens in eager steps. The first
round warms up (first compiles); per later round
``step_ms`` holds B's engine steps' wall times (medians over rounds), ``b_ms`` their sum and
``b_ms_per_layer`` that over the layers; the last round runs under the torch
profiler: ``ops_per_layer`` is the number of aten ops (top-level calls, not their children)
in B's steps over the number of layers, ``launches_per_layer`` the kernel launches (cuda),
``fused_rms_norm_per_layer`` torch's fused RMSNorm calls, ``top_ops`` the most frequent;
on cuda ``gpu_ms_per_layer`` the kernels' summed device time in that round's B steps over the
layers (near ``b_ms_per_layer``: the step waits on the GPU, not the host) and
``top_kernels`` the kernels taking most of it (us a layer). One JSON line per model::

    python benchmarks/hybrid_host_step.py --device cpu --tiny --models mamba2 granite4h
    python benchmarks/hybrid_host_step.py --device cuda --models mamba2 granite4h

Session 21 on an H100 (bf16, before the host cuts below): Mamba2 9.82 ms a step, 0.409 ms a
layer, ``ops_per_layer`` 24.1, ``launches_per_layer`` 7.3, ``gpu_ms_per_layer`` 0.066; Granite
4.0-H 0.646 / 33.2 / 11.0 / 0.138. Expected after them (the conv in one launch, the norms
without reshape / view / promote_types, the state cache's slot views kept, plain-int launch
arithmetic): Mamba2 ``ops_per_layer`` ~17 (``aten::promote_types`` and ``aten::view`` gone,
``aten::reshape`` 6 -> 4, ``aten::select`` 4 -> 2, 0 once a snapshot slot was restored before),
``launches_per_layer`` ~6.3, Granite ~23 ops (two norms a layer) and ~10 launches; the host
time a layer falls by their share (each op ~3-5 us of host on CUDA, a Triton launch ~10-20).
On the CPU the same counts come from the emulated cuda path's layer test
(``tests/models/test_mamba_mixer_host.py``, ``TRITON_INTERPRET=1``: 12 ops a layer, 17 before).

Session 22 (mambahost2), measured on an H100 before it: Mamba2 9.31 ms, 0.388 ms of host a
layer against ``gpu_ms_per_layer`` 0.065, 17.0 ops / 6.3 launches; Granite 4.0-H 23.47 /
0.587 / 0.138 / 19.3 / 10.1. Its cut is inside the launches (``kernels/launch.FastLaunch``:
Triton's per-call binding skipped once a specialization was seen), so expected after it: the
same ops and launches a layer, ``b_ms_per_layer`` lower by ~4 launches x 10-20 us (Mamba2) and
more for Granite; ``TESSELLM_TRITON_FAST_LAUNCH=0`` gives the before on the same machine
(``benchmarks/mambahost2_device.sh`` runs both).

``--no-inpass scan`` / ``--no-inpass conv`` turn the ops' in-step saves off (the op flags
``mamba_state_saves`` / ``mamba_conv_state_saves`` unset on the model's ops): the scan then
runs once per piece between the saves, the conv's windows are copied before it (the paths
before plugin API 21 / 23's Triton saves), to split a change of the step between them.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from recurrent_state_graphs import write_config  # noqa: E402


def shrink(path: str) -> None:
    """The written config at widths of 64 (CPU runs: host work, not products, dominates)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    small = {"hidden_size": 64, "num_heads": 4, "head_dim": 32, "state_size": 16,
             "vocab_size": 1024, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128, "shared_intermediate_size": 128, "mamba_n_heads": 4,
             "mamba_d_head": 32, "mamba_d_state": 16}
    for key, value in small.items():
        if hasattr(config, key):
            setattr(config, key, value)
    config.save_pretrained(path)


# the ops' in-step save flags --no-inpass unsets
INPASS_FLAGS = {"scan": ("mamba_state_saves", "gated_delta_state_saves"),
                "conv": ("mamba_conv_state_saves",)}

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernelEx", "cuLaunchKernel", "hipLaunchKernel")


def aten_counts(prof) -> collections.Counter:
    """Top-level aten ops (an op called inside another is not counted again), and under
    ``launches`` / ``fused_rms_norm`` every kernel launch and ``aten::_fused_rms_norm`` call."""
    counts = collections.Counter()
    for event in prof.events():
        if event.name in LAUNCHES:
            counts["launches"] += 1
        elif event.name == "aten::_fused_rms_norm":
            counts["fused_rms_norm"] += 1
        if event.name.startswith("aten::") and (event.cpu_parent is None
                                                or not event.cpu_parent.name.startswith("aten::")):
            counts[event.name] += 1
    return counts


def kernel_us(prof) -> collections.Counter:
    """Device time (us) per GPU kernel (and copy) name in the profiled region, and under
    ``(name, "n")`` how many ran."""
    import torch

    times = collections.Counter()
    for event in prof.events():
        if getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA:
            times[event.name] += event.time_range.elapsed_us()
            times[event.name, "n"] += 1
    return times


def unset_inpass(model, parts) -> int:
    """Set the in-step save flags of ``parts`` False on the model's ops objects; how many."""
    done = set()
    for module in model.modules():
        if hasattr(module, "op_flags"):  # the mixer reads its ops' flags once: again now
            module._flags = (None, None)
        ops = getattr(module, "ops", None)
        if ops is None or id(ops) in done:
            continue
        done.add(id(ops))
        for part in parts:
            for flag in INPASS_FLAGS[part]:
                setattr(ops, flag, False)
    return len(done)


def run(path: str, input_len: int, suffix: int, device: str, dtype: str, trials: int,
        no_inpass=()) -> dict:
    import torch

    from tessellm import LLM, SamplingParams

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    rounds, counts, kernels = [], collections.Counter(), collections.Counter()
    with LLM(path, load_format="dummy", dtype=dtype, max_model_len=input_len + suffix + 64,
             max_num_seqs=4, enable_prefix_caching=True, device=device) as llm:
        core = llm.engine.core
        layers = core.runner.model.config.num_hidden_layers
        if no_inpass and not unset_inpass(core.runner.model, no_inpass):
            raise SystemExit("--no-inpass: no ops object found on the model's modules")
        step = core.step
        for trial in range(trials + 1):
            a = [(7 * j + 13 * trial) % 1000 + 10 for j in range(input_len)]
            b = a + [(11 * j + 17 * trial) % 1000 + 10 for j in range(suffix)]
            llm.generate([{"prompt_token_ids": a}], one, use_tqdm=False)
            sync()
            times, profiled = [], trial == trials
            acts = [torch.profiler.ProfilerActivity.CPU]
            if device == "cuda":  # the runtime's launch calls show with device activity on
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            prof = torch.profiler.profile(activities=acts)

            def timed(*args, _times=times, **kwargs):
                if profiled:
                    prof.__enter__()
                t0 = time.perf_counter()
                try:
                    out = step(*args, **kwargs)
                    sync()
                    return out
                finally:
                    _times.append((time.perf_counter() - t0) * 1e3)
                    if profiled:
                        prof.__exit__(None, None, None)
                        counts.update(aten_counts(prof))
                        kernels.update(kernel_us(prof))

            core.step = timed
            out = llm.generate([{"prompt_token_ids": b}], one, use_tqdm=False)[0]
            del core.step
            if 0 < trial < trials:  # round 0 warms (first compiles), the last is profiled
                rounds.append(times)
        computed = len(b) - out.num_cached_tokens
    steps = [t for t in zip(*rounds)]  # per step position: its time in each round
    launches, fused = counts.pop("launches", 0), counts.pop("fused_rms_norm", 0)
    total = sum(counts.values())
    return {"layers": layers, "cached_tokens": out.num_cached_tokens, "computed": computed,
            "step_ms": [round(statistics.median(s), 2) for s in steps],
            "b_ms": round(statistics.median(sum(r) for r in rounds), 2),
            "b_ms_per_layer": round(statistics.median(sum(r) for r in rounds) / layers, 3),
            "ops_per_layer": round(total / layers, 1),
            "launches_per_layer": round(launches / layers, 1),  # cuda: kernel launches
            "fused_rms_norm_per_layer": round(fused / layers, 1),
            "top_ops": {k: round(v / layers, 1) for k, v in counts.most_common(12)},
            "gpu_ms_per_layer": round(sum(v for k, v in kernels.items()
                                          if not isinstance(k, tuple)) / 1e3 / layers, 3),
            # name: [us a layer, runs a layer]
            "top_kernels": {k[:48]: [round(v / layers, 1), round(kernels[k, "n"] / layers, 1)]
                            for k, v in collections.Counter(
                                {k: v for k, v in kernels.items()
                                 if not isinstance(k, tuple)}).most_common(8)}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["mamba2"])
    p.add_argument("--layers", type=int, default=0, help="0: the model's own layer count")
    p.add_argument("--input-len", type=int, default=200)
    p.add_argument("--suffix", type=int, default=40)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="", help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--tiny", action="store_true", help="widths of 64 (CPU)")
    p.add_argument("--trials", type=int, default=3, help="rounds after the warm one (>= 2)")
    p.add_argument("--no-inpass", nargs="*", default=[], choices=sorted(INPASS_FLAGS),
                   help="the ops' in-step saves off: scan (once per piece), conv (copied)")
    args = p.parse_args()
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    with tempfile.TemporaryDirectory() as root:
        for name in args.models:
            path = write_config(name, args.layers, root)
            if args.tiny:
                shrink(path)
            row = {"model": name, "device": args.device, "dtype": dtype, "tiny": args.tiny,
                   "no_inpass": args.no_inpass,
                   **run(path, args.input_len, args.suffix, args.device, dtype, args.trials,
                         args.no_inpass)}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
