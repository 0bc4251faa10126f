"""The engine core in its own process (``tessellm serve``, ``AsyncLLM``, data-parallel cores,
Ray Serve replicas) ends through ``EngineCore.shutdown()`` on every exit path: the KV
connector's saves under way are written (whole files, no temporary ones left), the worker
processes of a TP=2 core are gone once the core is, and it all fits in the parent's wait."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tessellm import SamplingParams
from tessellm.config import EngineArgs
from tessellm.core.engine_core import EngineCoreRequest
from tessellm.core.core_stop import CLOSE_WAIT_S, SHUTDOWN_BOUND_S
from tessellm.core.engine_process import EngineCoreClient, pack, unpack
from tessellm.core.ipc import TERMINATE_GRACE_S
from tessellm.kv_transfer.shared_storage_format import loadable
from tests.distributed.test_worker_failure import _descendants, _worker_processes

BS = 4  # tokens per block


def _producer(path) -> dict:
    return {"kv_connector": "SharedStorageConnector", "kv_role": "kv_producer",
            "kv_connector_extra_config": {"shared_storage_path": str(path)}}


def _client(model: str, **engine) -> EngineCoreClient:
    args = EngineArgs(model=model, device="cpu", dtype="float32", block_size=BS, num_kv_blocks=1024,
                      max_model_len=512, **engine)
    return EngineCoreClient(args, serving=False)


def _add(client: EngineCoreClient, rid: str, prompt: list[int], max_tokens: int) -> None:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    client.send_add(EngineCoreRequest(rid, prompt, params, time.time()))


def _messages(client: EngineCoreClient, timeout: float):
    """The core's messages as they come, for ``timeout`` seconds at most."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.output.poll(100):
            yield unpack(client.output.recv())


def _wait_for_tokens(client: EngineCoreClient, rids: set, timeout: float = 60.0) -> None:
    """Until the core has sent a token of every request in ``rids`` (their prefills ran, so
    every prompt's saves are under way). Not the first outputs: the core may take the adds
    over several loop turns (a loaded machine), and a first step of one request alone saved
    120 of the 960 blocks before the message that ends the core arrived."""
    waiting = set(rids)
    for msg in _messages(client, timeout):
        assert msg[0] != "dead", msg
        if msg[0] == "outputs":
            waiting -= {o["request_id"] for o in msg[1] if o.get("new_token_ids")}
            if not waiting:
                return
    raise AssertionError(f"the core produced no token for {sorted(waiting)}")


def _last_words(client: EngineCoreClient, timeout: float = 60.0) -> str:
    """Why the exited core says it stopped: its ``dead`` message's text, read past the outputs
    and stats before it. Waited for, not read until a quiet gap: on a loaded machine the
    parent's socket may take longer than any gap to hand over what the core sent."""
    for msg in _messages(client, timeout):
        if msg[0] == "dead":
            return msg[1]
    raise AssertionError(f"the core sent no 'dead' message within {timeout:.0f} s of exiting")


def _files(path) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)


def _prompts() -> list[list[int]]:
    """Eight 480-token prompts: 960 blocks to save, in one step."""
    rng = random.Random(5)
    return [[rng.randrange(3, 384) for _ in range(480)] for _ in range(8)]


def _saving_client(model: str, path, **engine) -> EngineCoreClient:
    """A producer core whose eight prompts (max_tokens=1) have finished their one step: their
    blocks' files are being written now."""
    client = _client(model, kv_transfer_config=_producer(path), max_num_batched_tokens=4096,
                     max_num_seqs=8, **engine)
    try:
        for i, prompt in enumerate(_prompts()):
            _add(client, f"r{i}", prompt, max_tokens=1)
        _wait_for_tokens(client, {f"r{i}" for i in range(len(_prompts()))})
    except BaseException:
        client.close()
        raise
    return client


def _assert_all_saved(path, ranks: int) -> None:
    """Every block of every prompt, each rank's file whole; no temporary file left."""
    files = _files(path)
    assert not [f for f in files if ".tmp" in os.path.basename(f)]
    blocks = [f for f in files if f.endswith(".kv")]
    assert len(blocks) == ranks * sum(len(p) // BS for p in _prompts())
    assert all(loadable(f, None) for f in blocks)


@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
def test_kv_saves_under_way_at_shutdown_are_written(tiny_model_dir, tmp_path, tp):
    """The shutdown is asked for as soon as the tokens arrive, while the files are still being
    written (before, none was left: the core exited and its writer threads with it): the core,
    and each worker rank of a TP=2 core, writes them all before it exits. The TP=2 core's
    workers are gone once it is."""
    before = _descendants(os.getpid())
    client = _saving_client(tiny_model_dir("llama"), tmp_path, tensor_parallel_size=tp)
    try:
        workers = _worker_processes(client.proc.pid, before) if tp > 1 else []
        assert len(workers) == (tp if tp > 1 else 0), workers
    finally:
        client.close()
    assert client.exit_code() == 0
    _assert_all_saved(tmp_path, ranks=tp)
    assert not [pid for pid in workers if _running(pid)]


def test_sigterm_shuts_the_core_down(tiny_model_dir, tmp_path):
    """SIGTERM (what the parent sends a core that did not stop in time, or anyone's ``kill``)
    ends the core through its shutdown too, in the time the parent gives it before a kill: its
    saves under way are written, and the parent hears why it stopped."""
    client = _saving_client(tiny_model_dir("llama"), tmp_path)
    try:
        t0 = time.monotonic()
        os.kill(client.proc.pid, signal.SIGTERM)
        client.proc.join(timeout=TERMINATE_GRACE_S)
        took = time.monotonic() - t0
        assert client.exit_code() == 1 and took < TERMINATE_GRACE_S, (client.exit_code(), took)
        assert _last_words(client) == "CoreTerminated: The engine core process got SIGTERM; it shuts down."
    finally:
        client.close()
    _assert_all_saved(tmp_path, ranks=1)


def test_an_error_in_the_loop_shuts_the_core_down(tiny_model_dir, tmp_path):
    """A core whose loop fails (here a message it does not know) reports it (``dead``) and
    still shuts down: its saves under way are written."""
    client = _saving_client(tiny_model_dir("llama"), tmp_path)
    try:
        client.input.send(pack(["no-such-message"]))
        client.proc.join(timeout=CLOSE_WAIT_S)
        assert client.exit_code() == 1
        assert "no-such-message" in _last_words(client)
    finally:
        client.close()
    _assert_all_saved(tmp_path, ranks=1)


def test_a_core_whose_parent_is_gone_shuts_down(tiny_model_dir, tmp_path):
    """The API process dies (``os._exit``, no close) right after the step: its core notices,
    and writes its saves under way before it exits."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = ("import os\n"
              "from tests.core.test_core_process_shutdown import _saving_client\n"
              f"client = _saving_client({tiny_model_dir('llama')!r}, {str(tmp_path)!r})\n"
              "print(client.proc.pid, flush=True)\n"
              "os._exit(0)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    parent = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True,
                            text=True, timeout=300)
    assert parent.returncode == 0, parent.stderr
    core = int(parent.stdout.split()[-1])
    deadline = time.monotonic() + 2 + SHUTDOWN_BOUND_S  # it polls for its parent every second
    while _running(core) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(core)
    _assert_all_saved(tmp_path, ranks=1)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited child its parent has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
