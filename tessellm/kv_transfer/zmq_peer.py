"""``ZmqPeerConnector``: disaggregated prefill between engines over TCP (ZeroMQ), with no
shared file system: the producer keeps the blocks it computes in host memory and serves them;
the consumer asks it which it has and fetches them.

    producer (kv_producer)                         consumer (kv_consumer)
    every rank r: a block store in host memory     scheduler half: lookups on its lookup
      (LRU, store_bytes a rank) and a server         thread, "has" to every rank's server
      thread on tcp://kv_bind:(kv_port + r)        worker rank r: "get" to the producer's
      (ROUTER): "has" -> the run of keys held,       rank r (reader pool threads, a socket
      "get" -> the blocks, header and payload        each), checked and copied in as files are

Everything else is the shared-storage connector's (``shared_storage.py``: keys, the scheduler
half, background loads, staging buffers, saves behind the step, checksums, stats): only where
a block lives differs (``setup_store``, ``_look``, ``read_blocks``, ``present``,
``write_block``, ``discard``). A block travels as a file's bytes (``shared_storage_format``:
the 128-byte header with its key, rank, layout digest and checksum, then the payload), so the
consumer checks it as it checks a file, and a request whose block is missing, evicted, corrupt
or late (``timeout_s``) is recomputed: never a wrong token, never a stalled step. A consumer
whose engine differs from the producer's (model files, dtypes, block size, layout: another
namespace) is told so once in its log, and every lookup misses.

Routing (xPyD, vLLM's proxy flow; ``params.py``): a producer hands back, for a finished
``do_remote_decode`` request, where it serves the blocks (``request_finished``:
``remote_host`` = ``kv_host``, ``remote_port`` = ``kv_port``...); a consumer request whose
``kv_transfer_params`` carry them is looked up at and loaded from that producer (``_source``:
its "where", which travels to the workers in the step's ``meta["sources"]``; a socket per
thread and producer, kept: ``_SOCKETS_PER_THREAD`` at most), ``kv_peer`` (optional) being
the default; ``allowed_producers`` (optional) limits whom requests may name. A producer that
does not answer is a miss for its requests alone (``_down``, a bounded ``PeerBackoff`` per
address; ``_mark_down``).

Wire protocol ``tslkv-peer/2`` (multipart frames; the client is a DEALER): a request is
``[b"tslkv-peer/2", op, namespace, tag, key...]`` (``tag``: the client's number for it, echoed
in the reply, so a late or misrouted reply is never taken for another's); op ``b"has"`` (reply
``[b"ok", tag, run]``: how many of the keys, from the first, the store holds), ``b"get"``
(reply ``[b"ok", tag, block...]``, each block a frame of its own, sent zero-copy from the
store, an empty frame for a block not held) or ``b"drop"`` (a consumer found the blocks bad:
removed, reply ``[b"ok", tag]``); a namespace other than the server's gets ``[b"namespace",
tag, its namespace]``; a malformed request or another protocol version ``[b"error", message]``
(the server goes on). A block's frame is a file's bytes (header with its own version, key,
rank, layout, checksum; then the payload), checked as a file is.

Speed (``benchmarks/kvpeer_io.py``): a consumer rank's reader threads each keep
``_IN_FLIGHT`` "get" messages of ``_GET_BYTES`` (8 MiB: 4 blocks of an 8B model) in flight on
their socket, so the TCP stream never waits for a round trip; replies are received without a
copy (``recv_multipart(copy=False)``) and each block's payload goes from the ZeroMQ frame into
the staging buffer in one strided numpy copy (the GIL let go; its crc32, if any, over the
frame). The staging chunk before is copied to the device meanwhile (two staging buffers). The
ZeroMQ contexts get ``_io_threads()`` I/O threads (a socket's connection is served by one).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict, deque
from typing import Optional

import numpy as np

from tessellm.kv_transfer import shared_storage_format as fmt
from tessellm.kv_transfer.address import (WILDCARDS, host_key, join_host_port, producer_key, reachable_host,
                                          split_host_port)
from tessellm.kv_transfer.peer_backoff import PeerBackoff
from tessellm.kv_transfer.params import (ANY_PRODUCER, decode_params, producer_allowed, remote_decode,
                                         remote_producer)
from tessellm.kv_transfer.shared_storage import _EXTRA_KEYS, SharedStorageConnector, _params

logger = logging.getLogger(__name__)

_PEER_KEYS = (_EXTRA_KEYS - {"shared_storage_path"}) | {"kv_port", "kv_bind", "kv_peer",
                                                           "store_bytes", "store_ahead_bytes",
                                                           "timeout_s", "kv_host",
                                                           "allowed_producers"}
_DEFAULT_PORT = 14579
_MAX_PORT = 65535  # the highest TCP port
_DEFAULT_STORE = 4 << 30  # bytes of blocks a producer rank keeps (LRU)
PROTOCOL = b"tslkv-peer/2"  # the first frame of every request (version 1 had none)
_GET_BYTES = 8 << 20  # a "get" message asks for this many bytes of blocks (at least one block)
_GET_MAX = 64  # ... and this many blocks at most
_IN_FLIGHT = 4  # "get" messages a reader thread keeps in flight on its socket
_AHEAD_START = 64 << 20  # a producer's store keeps this much memory made and touched ahead of
# its saves from start (store_ahead_bytes); saves that outrun it double it, up to the larger of
# store_ahead_bytes and ...
_AHEAD_BYTES = 1 << 30  # ... this; never more than ...
_AHEAD_SLOTS = 512  # ... this many slots (tiny blocks: little memory), nor store_bytes
_SLAB_BYTES = 32 << 20  # memory is made a slab of this many bytes of slots at most at a time
_POLL_MS = 100  # the server looks at its stop flag this often
_LOOKUP_TIMEOUT_S = 1.0  # a "has" waits at most this (a small message), timeout_s if less
# Sockets a thread keeps open, one per producer rank it talked to, the least recently used
# closed past this (xPyD: producers come and go; a kept socket to a gone one reconnects forever)
_SOCKETS_PER_THREAD = 32


class BlockStore:
    """A producer rank's blocks (header and payload bytes, by key), least recently used first
    out past ``capacity`` bytes. Thread-safe: the writer pool puts, the server gets.

    The blocks live in slots of slabs of anonymous memory (transparent huge pages asked for),
    made and touched ahead of the puts by a thread of the store's (``slot_bytes`` given; the
    window ahead, ``ahead``, starts at ``ahead_bytes``, and each put that finds no slot made
    ahead doubles it, up to ``ahead_max``: the larger of ``ahead_bytes`` and ``_AHEAD_BYTES``,
    ``_AHEAD_SLOTS`` slots and ``capacity`` at most; an idle producer holds ``ahead_bytes``, a
    busy one ramps up to keep its bursts in warm memory; ``close`` ends the thread), and
    reused once a block is evicted or replaced: a block is one
    copy into memory touched before, not a fresh allocation whose page faults cost more than
    the copy (a 2 MiB ``bytes`` a block: ~1 GB/s a core; a warm slot: memory speed). The
    server sends a block straight from its slot (zero-copy); a slot whose block went while a
    send of it is under way is reused only once ZeroMQ is done with it (``track``). A blob of
    another size than the first one put (tests) is kept as its own ``bytes``."""

    def __init__(self, capacity: int, slot_bytes: int = 0, ahead_bytes: int = _AHEAD_START):
        self.capacity, self.nbytes = capacity, 0
        self.blocks: OrderedDict[str, tuple] = OrderedDict()  # key -> (memoryview, slot or None)
        self.lock = threading.Lock()
        self.slot_bytes = slot_bytes  # slots are this long (0: the first blob's size)
        self.slots: list = []  # slot -> its memoryview (in a slab)
        self.free: list = []  # slots free to write
        self.sending: dict = {}  # slot -> sends of it under way
        self.gone: set = set()  # slots whose block went while it was being sent
        self.sends: deque = deque()  # (tracker, slots) of sends under way, oldest first
        self._slabs: list = []
        self._growing = False  # a slab is being made outside the lock
        # Slots kept made and touched ahead of the puts (by a thread of the store's, while it
        # may grow): a request's saves then copy into warm memory. The window grows as saves
        # outrun it (``_outrun``), from ahead_bytes up to ahead_max.
        self.ahead_max = self.ahead = 0
        if slot_bytes and ahead_bytes > 0:
            # 512 slots at most (tiny blocks: few bytes)
            self.ahead = min(capacity, ahead_bytes, _AHEAD_SLOTS * slot_bytes)
            self.ahead_max = min(capacity, max(self.ahead, _AHEAD_BYTES), _AHEAD_SLOTS * slot_bytes)
        self._wake = threading.Condition(self.lock)
        self._stop = False
        self._grower = None
        if self.ahead:
            self._grower = threading.Thread(target=self._grow_ahead, name="tessellm-kv-store",
                                            daemon=True)
            self._grower.start()

    def close(self) -> None:
        """The thread that makes slots ahead ends (the blocks stay readable)."""
        with self.lock:
            self._stop = True
            self._wake.notify_all()
        if self._grower is not None:
            self._grower.join()
            self._grower = None

    def _grow_ahead(self) -> None:
        while True:
            with self.lock:
                self._wake.wait_for(lambda: self._stop or self._room_ahead())
                if self._stop:
                    return
                self._growing = True
                # the slots missing from the window (a slab at most)
                want = -(-(self.ahead - len(self.free) * self.slot_bytes) // self.slot_bytes)
            made = None
            try:
                made = self._make_slab(touch=True, want=want)  # the page faults, outside the lock
            except (OSError, ValueError, MemoryError) as exc:
                logger.warning("KV block store: no memory made ahead (%s); saves make it.", exc)
                return
            finally:
                with self.lock:
                    self._growing = False
                    if made is not None:
                        self._add_slab(*made)

    def _room_ahead(self) -> bool:
        """Fewer free slots than ``ahead`` and room for more (under the lock)."""
        return (not self._growing and len(self.free) * self.slot_bytes < self.ahead
                and (len(self.slots) + 1) * self.slot_bytes <= self.capacity)

    def has(self, key: str) -> bool:
        with self.lock:
            return key in self.blocks

    def put(self, key: str, blob) -> None:
        """A block, given whole (bytes-like)."""
        self.put_parts(key, [memoryview(blob)])

    def put_parts(self, key: str, parts: list) -> None:
        """A block given as the parts of its bytes (header, payload parts), copied in once."""
        size = sum(len(p) for p in parts)
        with self.lock:
            slot = self._take(size)
        if slot is None:
            view = memoryview(b"".join(parts))
        else:
            view, at = self.slots[slot], 0
            for part in parts:  # numpy: the GIL let go while it copies
                np.copyto(np.frombuffer(view[at:at + len(part)], np.uint8), np.frombuffer(part, np.uint8))
                at += len(part)
        with self.lock:
            old = self.blocks.pop(key, None)
            if old is not None:
                self._release(old)
            self.nbytes += size
            self.blocks[key] = (view, slot)
            while self.nbytes > self.capacity and len(self.blocks) > 1:
                self._release(self.blocks.popitem(last=False)[1])

    def _take(self, size: int) -> Optional[int]:
        """A slot to write a block of ``size`` bytes into (under the lock): a free one, a new
        one while the slots fit ``capacity``, else the least recently used block's not being
        sent (evicted now: the new block would push it out anyway); None: a blob of another
        size, or every slot being sent (the block gets memory of its own)."""
        if not self.slot_bytes:
            self.slot_bytes = size
        if size != self.slot_bytes:
            return None
        self._reap()
        if self._grower is not None and self._room_ahead():
            self._wake.notify()
        while not self.free:
            if (len(self.slots) + 1) * size <= max(self.capacity, size):
                self._outrun()
                self._grow()  # (the thread ahead may add a slab past this one: trimmed)
                continue
            old = next((k for k, (_, slot) in self.blocks.items()
                        if slot is not None and not self.sending.get(slot)), None)
            if old is None:
                return None
            self._release(self.blocks.pop(old))
        return self.free.pop()

    def _outrun(self) -> None:
        """A put found no slot made ahead (under the lock): the window doubles (up to
        ``ahead_max``), and the thread ahead makes it."""
        if self._grower is not None and self.ahead < self.ahead_max:
            self.ahead = min(self.ahead_max, max(2 * self.ahead, self.slot_bytes))
            self._wake.notify()

    def _grow(self) -> None:
        """A slab made in the put's path (under the lock; the thread ahead was outrun)."""
        self._add_slab(*self._make_slab(touch=False))

    def _make_slab(self, touch: bool, want: Optional[int] = None) -> tuple:
        """A slab of ``want`` slots (default: as many as a slab holds), within the capacity."""
        import mmap

        size = self.slot_bytes
        n = max(1, min(_SLAB_BYTES // size, max(self.capacity, size) // size - len(self.slots),
                       want or _SLAB_BYTES))
        slab = mmap.mmap(-1, n * size)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                slab.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass
        if touch:  # every page faulted in now (numpy: the GIL let go)
            np.frombuffer(slab, np.uint8)[::4096] = 0
        return slab, n

    def _add_slab(self, slab, n: int) -> None:
        size = self.slot_bytes
        n = max(0, min(n, max(self.capacity, size) // size - len(self.slots)))
        if not n:
            return  # the puts grew it meanwhile
        self._slabs.append(slab)
        whole = memoryview(slab)
        for i in range(n):
            self.free.append(len(self.slots))
            self.slots.append(whole[i * size:(i + 1) * size])

    def _release(self, entry: tuple) -> None:
        """A block gone (under the lock): its bytes uncounted, its slot free (once unsent)."""
        view, slot = entry
        self.nbytes -= len(view)
        if slot is None:
            return
        if self.sending.get(slot):
            self.gone.add(slot)
        else:
            self.free.append(slot)

    def _reap(self) -> None:
        """Sends ZeroMQ is done with: their slots no longer pinned (under the lock)."""
        while self.sends and self.sends[0][0].done:
            for slot in self.sends.popleft()[1]:
                self.sending[slot] -= 1
                if not self.sending[slot]:
                    del self.sending[slot]
                    if slot in self.gone:
                        self.gone.discard(slot)
                        self.free.append(slot)

    def run(self, keys: list) -> int:
        """How many of ``keys``, from the first, are held."""
        with self.lock:
            n = 0
            while n < len(keys) and keys[n] in self.blocks:
                n += 1
            return n

    def drop(self, keys: list) -> None:
        with self.lock:
            for key in keys:
                entry = self.blocks.pop(key, None)
                if entry is not None:
                    self._release(entry)

    def blob(self, key: str) -> Optional[bytes]:
        """A copy of the block's bytes (tests)."""
        with self.lock:
            entry = self.blocks.get(key)
            return None if entry is None else bytes(entry[0])

    def get(self, keys: list) -> tuple:
        """The blocks' bytes (views of their slots; ``b""`` for a block not held) and the slots
        they are in: pinned until ``track`` is told the send of them is done."""
        with self.lock:
            out, slots = [], []
            for key in keys:
                entry = self.blocks.get(key)
                if entry is None:
                    out.append(b"")
                    continue
                self.blocks.move_to_end(key)
                out.append(entry[0])
                if entry[1] is not None:
                    slots.append(entry[1])
                    self.sending[entry[1]] = self.sending.get(entry[1], 0) + 1
            return out, slots

    def track(self, tracker, slots: list) -> None:
        """The slots ``get`` gave are being sent: free to reuse once ``tracker.done``."""
        if slots:
            with self.lock:
                self.sends.append((tracker, slots))
                self._reap()


class BlockServer:
    """A thread serving a ``BlockStore`` on ``tcp://bind:port`` (a ROUTER socket of the
    ZeroMQ context ``zmq_context``; the thread closes it when ``close`` stops it)."""

    def __init__(self, store: BlockStore, namespace: str, bind: str, port: int, zmq_context):
        import zmq

        self.store, self.namespace = store, namespace.encode()
        self.sock = zmq_context.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IPV6, 1)  # an IPv6 kv_bind (an IPv4 one works as before)
        self.address = join_host_port(bind, port)
        try:
            self.sock.bind(f"tcp://{self.address}")
        except zmq.ZMQError as exc:
            self.sock.close()
            raise ValueError(f"ZmqPeerConnector cannot listen on {self.address} ({exc}); give "
                             "another kv_port (rank r listens on kv_port + r) or kv_bind.") from None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="tessellm-kv-serve", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import zmq

        while not self.stop.is_set():
            if not self.sock.poll(_POLL_MS):
                continue
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                continue
            try:
                reply = self._reply(frames[1:])
            except Exception as exc:  # noqa: BLE001 - anyone may connect: never the thread's end
                reply = [b"error", f"bad request ({type(exc).__name__}: {exc}); a request is "
                                   f"[{PROTOCOL.decode()}, op, namespace, tag, key...], keys "
                                   "ASCII".encode()]
            self.sock.send_multipart([frames[0]] + reply, copy=False)
        self.sock.close()

    def _reply(self, msg: list) -> list:
        if not msg or msg[0] != PROTOCOL:
            raise ValueError(f"not protocol {PROTOCOL.decode()} (an engine of another tessellm "
                             "version?)" if msg and msg[0].startswith(b"tslkv-peer/")
                             else f"{len(msg)} frame(s), the first not {PROTOCOL.decode()}")
        if len(msg) < 4:
            raise ValueError(f"{len(msg)} frame(s)")
        op, namespace, tag = msg[1], msg[2], msg[3]
        keys = [bytes(k).decode("ascii") for k in msg[4:]]
        if namespace != self.namespace:
            return [b"namespace", tag, self.namespace]
        if op == b"has":
            return [b"ok", tag, str(self.store.run(keys)).encode()]
        if op == b"get":
            import zmq

            blobs, slots = self.store.get(keys)
            # zero-copy from the store's slots past pyzmq's copy_threshold (64 KiB; a block of
            # a real model), tracked: a slot is reused once ZeroMQ is done with it
            frames = [zmq.Frame(b, copy=None, track=True) if len(b) else b for b in blobs]
            if slots:
                self.store.track(zmq.MessageTracker(*[f for f in frames if len(f)]), slots)
            return [b"ok", tag] + frames
        if op == b"drop":
            self.store.drop(keys)
            return [b"ok", tag]
        raise ValueError(f"unknown op {op!r}")

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def _io_threads() -> int:
    """ZeroMQ I/O threads of a connector's context: a connection is served by one, so a few
    carry the reader threads' sockets in parallel (one on a small host)."""
    return max(1, min(4, (os.cpu_count() or 1) // 4))


class _Clients:
    """A DEALER socket per thread and peer address (ZeroMQ sockets are not thread-safe), of
    the connector's own context; a thread keeps ``per_thread`` at most, closing its least
    recently used past that. A request that times out, or whose reply is not its own,
    drops its socket: a late reply never answers a later request. ``close`` closes every
    socket left and ends the context, once the threads that used them are done (the
    connector's pools are shut down first)."""

    def __init__(self, per_thread: int = _SOCKETS_PER_THREAD):
        import zmq

        self.per_thread = per_thread
        self.context = zmq.Context(io_threads=_io_threads())
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: set = set()  # every socket not yet closed, of any thread
        self._tags = itertools.count(1)
        self.stopping = False  # the connector shuts down: waits for replies end at once

    @property
    def closed(self) -> bool:
        return self.context.closed

    def _socket(self, address: str):
        import zmq

        socks = self._local.__dict__.setdefault("socks", OrderedDict())
        sock = socks.get(address)
        if sock is not None:
            socks.move_to_end(address)
            return sock
        while len(socks) >= self.per_thread:  # (no reply is due on an idle socket)
            oldest = next(iter(socks))
            self._drop(oldest, socks[oldest])
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IPV6, 1)  # a producer at an IPv6 address ("[v6]:port")
        try:
            sock.connect(f"tcp://{address}")
        except zmq.ZMQError as exc:
            # an address ZeroMQ cannot read (a request's remote_host): the socket is not kept
            # (a send on it would wait for a peer forever, and close() would hang on it)
            sock.close()
            raise ConnectionError(f"cannot connect to {address}: {exc}") from None
        socks[address] = sock
        with self._lock:
            self._open.add(sock)
        return sock

    def _drop(self, address: str, sock) -> None:
        with self._lock:
            self._open.discard(sock)
        sock.close()
        self._local.socks.pop(address, None)

    def exchange(self, address: str, requests: list, timeout: float, window: int = 1):
        """``requests`` (each ``[op, namespace, key...]``) sent to ``address`` over this
        thread's socket, up to ``window`` of them in flight; yields each one's reply in order:
        ``[status, payload...]`` (the status as bytes, the rest ZeroMQ frames received without
        a copy: ``.buffer`` is the bytes), or None for it and every later one if it
        did not come back within ``timeout`` seconds of the one before (or came back not
        tagged as its own: the socket is dropped either way)."""
        sock = self._socket(address)
        tags, sent, got = [], 0, 0
        try:
            while got < len(requests):
                while sent < len(requests) and sent - got < window:
                    tag = str(next(self._tags)).encode()
                    op, namespace, *keys = requests[sent]
                    sock.send_multipart([PROTOCOL, op, namespace, tag, *keys])
                    tags.append(tag)
                    sent += 1
                reply = self._receive(sock, timeout)
                if reply is not None and reply[0].bytes == b"error":
                    reply = [b"error"] + reply[1:]  # untagged: a request it could not read
                elif reply is not None and len(reply) >= 2 and reply[1].bytes == tags[got]:
                    reply = [reply[0].bytes] + reply[2:]
                else:  # none in time, or not this request's
                    break
                got += 1
                yield reply
        finally:
            if got < sent:  # replies still due on this socket: nobody else gets them
                self._drop(address, sock)
        for _ in range(got, len(requests)):
            yield None

    def _receive(self, sock, timeout: float):
        """The socket's next reply (frames, not copied), or None: none within ``timeout``
        seconds, or the connector shuts down meanwhile (looked at every ``_POLL_MS``)."""
        end = time.monotonic() + timeout
        while not self.stopping:
            left = end - time.monotonic()
            if sock.poll(max(0, int(min(left, _POLL_MS / 1000) * 1000))):
                return sock.recv_multipart(copy=False)
            if left <= _POLL_MS / 1000:
                return None
        return None

    def request(self, address: str, frames: list, timeout: float) -> Optional[list]:
        """One request (``[op, namespace, key...]``): its reply's frames as bytes (status
        first, the tag left out), or None (no reply in time)."""
        reply = next(self.exchange(address, [frames], timeout))
        return None if reply is None else [reply[0]] + [f.bytes for f in reply[1:]]

    def close(self) -> None:
        """Every socket closed (linger 0: unsent requests dropped) and the context ended."""
        with self._lock:
            socks, self._open = self._open, set()
        for sock in socks:
            sock.close(linger=0)
        self.context.term()  # returns at once: no socket of it is open


def _host_port(address) -> Optional[tuple]:
    """``"host:port"`` (``"[v6]:port"``) as ``(host, port)``, or None: not of that form."""
    try:
        return split_host_port(address, "address")
    except ValueError:
        return None


class ZmqPeerConnector(SharedStorageConnector):
    """Blocks served by the producer's ranks over TCP (module docstring)."""

    extra_keys = _PEER_KEYS

    def setup_store(self, extra: dict) -> None:
        port, bind = extra.get("kv_port", _DEFAULT_PORT), extra.get("kv_bind", "127.0.0.1")
        peer, store = extra.get("kv_peer"), extra.get("store_bytes", _DEFAULT_STORE)
        timeout = extra.get("timeout_s", 10.0)
        ahead = extra.get("store_ahead_bytes", _AHEAD_START)
        top = _MAX_PORT + 1 - self.context.world_size  # the highest rank 0 port: rank r is on it + r
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port <= top:
            raise ValueError(f"ZmqPeerConnector's kv_port is the TCP port its rank 0 listens on "
                             f"(rank r: kv_port + r), 1 to {top} for its {self.context.world_size} "
                             f"rank(s), e.g. {_DEFAULT_PORT}; got {port!r}.")
        if not isinstance(bind, str) or not bind:
            raise ValueError(f"ZmqPeerConnector's kv_bind is the address it listens on, e.g. "
                             f"'0.0.0.0' for every interface; got {bind!r}.")
        if not isinstance(store, int) or store <= 0:
            raise ValueError(f"ZmqPeerConnector's store_bytes is the host memory a producer rank "
                             f"keeps blocks in, a positive integer; got {store!r}.")
        if not isinstance(ahead, int) or isinstance(ahead, bool) or ahead < 0:
            raise ValueError(f"ZmqPeerConnector's store_ahead_bytes is the host memory a producer "
                             f"rank's store makes and touches ahead of its saves from start (it "
                             f"grows as saves outrun it; 0: none made ahead), an integer >= 0; "
                             f"got {ahead!r}.")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
            raise ValueError(f"ZmqPeerConnector's timeout_s is how long a lookup or load waits "
                             f"for the producer, in seconds; got {timeout!r}.")
        self.peer = None  # the default producer (kv_peer); requests may name others
        if self.config.is_consumer and peer is not None:
            try:
                self.peer = split_host_port(peer, "kv_peer")
            except ValueError as exc:
                raise ValueError(f"ZmqPeerConnector's kv_peer is the default producer's 'host:port' "
                                 "(its kv_host or kv_bind address and kv_port), e.g. "
                                 f"'10.0.0.5:{_DEFAULT_PORT}'. {exc} Leave it out to fetch only from "
                                 "the producers requests name (kv_transfer_params).") from None
            self._check_rank_ports(self.peer[1], f"kv_peer {peer!r}", top)
        bind = host_key(bind, "ZmqPeerConnector's kv_bind (the address it listens on)")
        host = extra.get("kv_host")
        if host is not None and isinstance(host, str) and host:  # "0::0" is "::", a wildcard
            host = host_key(host, "ZmqPeerConnector's kv_host (handed back as remote_host)")
        if host is not None and (not isinstance(host, str) or not host or host in WILDCARDS):
            raise ValueError(f"ZmqPeerConnector's kv_host is the address consumers reach this "
                             f"producer at (handed back as remote_host), e.g. '10.0.0.5'; got "
                             f"{extra.get('kv_host')!r}.")
        self.host = host or reachable_host(bind)
        allowed = extra.get("allowed_producers")
        if allowed is not None and (not isinstance(allowed, list) or not all(
                isinstance(a, str) and a and not any(c.isspace() for c in a) for a in allowed)):
            raise ValueError("ZmqPeerConnector's allowed_producers is the producers a request's "
                             "kv_transfer_params may name besides kv_peer, a list of 'host' (any "
                             "port) or 'host:port' (its remote_host and remote_port), e.g. "
                             f"['10.0.0.5', '10.0.0.6:{_DEFAULT_PORT}'], or ['*'] for any (only "
                             f"behind a trusted proxy); leave it out for kv_peer alone; got {allowed!r}.")
        # Whom requests may name (docs/kv_transfer.md, "Whom a consumer asks"): None, any;
        # else these entries and kv_peer (unset: kv_peer alone), as address.producer_key has them
        self.allowed = None if allowed is not None and ANY_PRODUCER in allowed else frozenset(
            [producer_key(a, "ZmqPeerConnector's allowed_producers") for a in allowed or []]
            + ([join_host_port(*self.peer)] if self.peer else []))
        for entry in self.allowed or ():
            if not entry.endswith("]") and ":" in entry:  # "host:port" ("[v6]:port"), not a bare host
                self._check_rank_ports(int(entry.rpartition(":")[2]), f"allowed_producers entry {entry!r}", top)
        self._refused: set = set()  # the producers told refused in the log (a few at most)
        self.engine_id = uuid.uuid4().hex  # handed back as remote_engine_id (messages only)
        self.port, self.bind, self.store_bytes, self.timeout = port, bind, store, float(timeout)
        # A load waits timeout_s for each reply (the fetch then fails by itself); the loader
        # gives up on it only a second past that (a peer gone mid-transfer).
        self.load_timeout = self.timeout + 1.0
        self.store_ahead = ahead
        self._zmq = _Clients()  # this connector's sockets and ZeroMQ context
        self._down = PeerBackoff(self.store_down)  # producer ranks not asked for now (bounded)
        self._store: Optional[BlockStore] = None
        self._server: Optional[BlockServer] = None
        self._told_namespace = False

    def path(self, key: str, rank: int) -> str:  # for messages only: no files here
        return f"{key}.r{rank}"

    def store_name(self) -> str:
        return f"the peer {join_host_port(*self.peer)}" if self.peer else "no peer"

    def _check_rank_ports(self, port: int, what: str, top: int) -> None:
        """A producer's rank 0 port (kv_peer's, an allowed_producers entry's) whose ranks all
        have a port: rank r of ours fetches from its rank r on port + r."""
        if port > top:
            raise ValueError(f"ZmqPeerConnector's {what} puts the producer's rank "
                             f"{self.context.world_size - 1} on port {port + self.context.world_size - 1}, "
                             f"past {_MAX_PORT} (rank r is on its port + r): give the producer's rank 0 "
                             f"port, its kv_port, 1 to {top} for {self.context.world_size} ranks.")

    def _rank_address(self, rank: int, where: Optional[str] = None) -> Optional[str]:
        """``host:port`` of the producer's rank (``where``: a producer a request named, its
        rank 0's ``host:port``; None: kv_peer), or None: no producer (none, or a request's
        producer whose rank would be past port 65535: none can listen there)."""
        peer = _host_port(where) if where is not None else self.peer
        if peer is None or peer[1] + rank > _MAX_PORT:
            return None
        return join_host_port(peer[0], peer[1] + rank)

    def allowed_producers(self) -> Optional[list]:
        if not self.config.is_consumer or self.allowed is None:
            return None
        return sorted(self.allowed)

    def _allowed(self, where: str) -> bool:
        """Whether a producer a request named may be asked (``allowed_producers``, kv_peer; the
        front end refused the others already: ``check_producer``); a refused one is told in
        the log once."""
        if producer_allowed(where, self.allowed):
            return True
        if where not in self._refused and len(self._refused) < 64:
            self._refused.add(where)
            logger.warning("KV producer %s named by a request's kv_transfer_params is not in "
                           "allowed_producers: not asked, the request computes its prompt.", where)
        return False

    def _address(self, rank: int, where: Optional[str] = None) -> Optional[str]:
        """The producer rank's address, or None: none, not allowed (``allowed_producers``), or
        it counts as down (``store_down_ms``)."""
        if where is not None and not self._allowed(where):
            return None
        address = self._rank_address(rank, where)
        if address is None or self._down.down(address):
            return None
        return address

    def _ask(self, rank: int, op: bytes, keys: list, where: Optional[str] = None) -> Optional[list]:
        """A request to the producer's rank: its reply's frames after ``ok``, or None (another
        namespace, no answer in time, an error: the blocks count as missing). A peer that did
        not answer is not asked again for ``store_down_ms``: a consumer whose producer is
        down costs its requests one lookup timeout in that time, not one each (a producer a
        request named as another's: that one alone)."""
        address = self._address(rank, where)
        if address is None:
            return None
        timeout = min(self.timeout, _LOOKUP_TIMEOUT_S) if op == b"has" else self.timeout
        reply = self._zmq.request(address, [op, self.context.namespace.encode()]
                                      + [k.encode() for k in keys], timeout)
        return self._answer(address, reply, timeout)

    def _answer(self, address: str, reply: Optional[list], timeout: float) -> Optional[list]:
        """A reply's frames after ``ok``; None for any other (told in the log)."""
        if reply is None and self._zmq.stopping:
            return None  # the connector shuts down: not the peer's failure
        if reply is None:
            self._down.mark(address)
            logger.warning("KV peer %s did not answer in %.1f s: its blocks count as missing "
                           "(it is asked again in %.1f s).", address, timeout, self.store_down)
            return None
        self._down.clear(address)
        if reply[0] == b"ok":
            return reply[1:]
        rest = [bytes(getattr(f, "buffer", f)) for f in reply[1:]]
        if reply[0] == b"namespace" and not self._told_namespace:
            self._told_namespace = True
            logger.warning("KV peer %s serves namespace %s, this engine is %s: the engines differ "
                           "(model files, dtype, KV-cache dtype, block size, parallel layout); "
                           "no block is shared.", address, rest[0].decode(errors="replace"),
                           self.context.namespace)
        elif reply[0] != b"namespace":
            logger.warning("KV peer %s: %s", address, b" ".join([reply[0]] + rest).decode(errors="replace"))
        return None

    def probe_store(self) -> None:
        """The probe of a peer marked down by a lookup timeout (``StoreHealth``): a "has" of
        no keys to every producer rank (not the ranks' own back-off), answered in 1 s."""
        for rank in range(self.context.world_size):
            address = join_host_port(self.peer[0], self.peer[1] + rank) if self.peer else None
            reply = None if address is None else self._zmq.request(
                address, [b"has", self.context.namespace.encode()], _LOOKUP_TIMEOUT_S)
            if reply is None or reply[0] != b"ok":
                raise ConnectionError(f"{address} did not answer")
            self._down.clear(address)

    # -- scheduler half: routing, lookups (on the lookup thread) ----------------------------

    def _source(self, request) -> Optional[str]:
        """The producer the request's kv_transfer_params name (``do_remote_prefill`` with
        ``remote_host`` and ``remote_port``: a proxy passed the producer's response params on),
        or None: kv_peer's."""
        return remote_producer(_params(request))

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        if self.peer is None and self._source(request) is None:
            return 0, False  # no kv_peer, and the request names no producer: nothing to ask
        return super().get_num_new_matched_tokens(request, num_computed_tokens)

    def _mark_down(self, why: str, where: Optional[str] = None) -> None:
        """A producer a request named that hung: that one alone is not asked for
        ``store_down_ms`` (kv_peer and the other producers go on)."""
        if where is None:
            super()._mark_down(why)
            return
        logger.warning("KV peer %s: %s; not asked for %.1f s.", where, why, self.store_down)
        for rank in range(self.context.world_size):
            self._down.mark(self._rank_address(rank, where))

    def _look(self, keys: list, start: int, where: Optional[str] = None) -> tuple:
        n = len(keys)
        for rank in range(self.context.world_size):
            reply = self._ask(rank, b"has", keys[:n], where)
            n = min(n, int(reply[0])) if reply else 0
            if n == 0:
                break
        return keys[:n], (start + n if n < len(keys) else None)

    def request_finished(self, request) -> Optional[dict]:
        """A producer's ``do_remote_decode`` request that finished (not aborted, no error): where a
        decode engine fetches its blocks (``params.decode_params``). Its output left once its
        saves were in this engine's store (``do_remote_decode`` waits for them)."""
        super().request_finished(request)
        if (not self.config.is_producer or not remote_decode(_params(request))
                or request.status.finish_reason in (None, "abort", "error")):
            return None
        bs = self.context.block_size
        return decode_params(self.engine_id, self.host, self.port, self.context.world_size,
                             len(request.prompt_token_ids) // bs * bs)

    # -- worker half ------------------------------------------------------------------------

    def register_kv_caches(self, caches, swap_blocks, synchronize, device) -> None:
        super().register_kv_caches(caches, swap_blocks, synchronize, device)
        if self.config.is_producer and self._server is None:
            self._store = BlockStore(self.store_bytes, fmt.HEADER_BYTES + self.block_bytes,
                                     self.store_ahead)
            self._server = BlockServer(self._store, self.context.namespace, self.bind,
                                       self.port + self.context.rank, self._zmq.context)
            logger.info("KV blocks of rank %d served on %s (%.1f GiB of host memory at most)",
                        self.context.rank, self._server.address, self.store_bytes / (1 << 30))

    def read_blocks(self, keys: list, views: list, where: Optional[str] = None) -> list:
        """Blocks fetched into ``views`` (each block's payload parts, in order)."""

        def place(i: int, payload) -> None:
            at = 0
            for v in views[i]:
                np.copyto(np.frombuffer(v, np.uint8), payload[at:at + len(v)])
                at += len(v)

        return self._fetch(keys, place, where)

    def read_run(self, keys: list, run: range, flat, n: int, where: Optional[str] = None) -> list:
        """Blocks ``run`` of a staging buffer of ``n`` (``flat``: uint8 numpy) fetched from
        ``where`` (a producer a request named; None: kv_peer): each payload scattered into the
        buffer's tensor-major parts by one strided copy."""
        return self._fetch(keys, self._placer(flat, n, run.start), where)

    def _fetch(self, keys: list, place, where: Optional[str] = None) -> list:
        """This rank's blocks of ``keys`` fetched from the producer's rank (``_IN_FLIGHT``
        messages of ``_GET_BYTES`` in flight), each checked as a file and its payload handed
        to ``place(index, uint8 array)`` (a view of the received frame): per block (checksum
        kind, checksum) of a whole block of this key, rank and layout (a crc32 checked here,
        over the frame; a sum64 is the caller's), else None. A block that fails its check is
        dropped at the producer (``discard``) once the messages in flight are in."""
        rank, out, bad = self.context.rank, [None] * len(keys), []
        address = self._address(rank, where)
        if address is None or not keys:
            return out
        per = max(1, min(_GET_MAX, _GET_BYTES // max(1, self.block_bytes)))
        namespace = self.context.namespace.encode()
        batches = [keys[lo:lo + per] for lo in range(0, len(keys), per)]
        replies = self._zmq.exchange(address, [[b"get", namespace] + [k.encode() for k in b]
                                               for b in batches], self.timeout, _IN_FLIGHT)
        for lo, batch, reply in zip(range(0, len(keys), per), batches, replies):
            self._reading()  # a reply came: the load bound counts afresh
            blobs = self._answer(address, reply, self.timeout)
            if blobs is None:
                break  # the rest are missing (no answer: the socket was dropped)
            for i, (key, frame) in enumerate(zip(batch, blobs)):
                raw = frame.buffer
                if not len(raw):
                    continue  # not held
                try:
                    out[lo + i] = fmt.check_block(raw, key, rank, self.layout, self.block_bytes,
                                                  crc=True)
                    place(lo + i, np.frombuffer(raw, np.uint8, offset=fmt.HEADER_BYTES))
                except ValueError as exc:
                    out[lo + i] = None
                    bad.append((key, exc))
        replies.close()
        for key, exc in bad:
            self.discard(key, exc, where)
        return out

    def discard(self, key: str, why, where: Optional[str] = None) -> None:
        """A bad block: the producer drops it (its next save of the block stores it afresh)."""
        logger.warning("KV block %s from the peer %s not loaded (%s): removed there; the "
                       "request is recomputed.", self.path(key, self.context.rank),
                       self._rank_address(self.context.rank, where), why)
        self._ask(self.context.rank, b"drop", [key], where)

    def present(self, key: str) -> bool:
        return self._store is not None and self._store.has(key)

    def write_block(self, key: str, views: list, sum64) -> None:
        if self._store is None:
            return
        header = fmt.block_header(key, self.context.rank, self.checksum, self.layout,
                                  self.block_bytes, views, sum64)
        self._store.put_parts(key, [memoryview(header), *views])

    def shutdown(self) -> None:
        """The engine stops: lookups under way end (each waits ``timeout_s`` at most, so they
        are waited for), the worker half's pools finish, the server thread closes its socket,
        then every client socket is closed and the ZeroMQ context ended: the port is free and
        no thread of the connector is left once this returns. Again: nothing."""
        if self._zmq.closed:
            return
        self._zmq.stopping = True  # replies waited for (a load's, a lookup's): not any more
        self.health.close(wait=2 * _LOOKUP_TIMEOUT_S)  # a probe's socket: done with first
        if self._lookup_threads is not None:
            self._lookup_threads.shutdown(wait=True, cancel_futures=True)
            self._lookup_threads = None
        super().shutdown()
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._store is not None:
            self._store.close()
        self._zmq.close()
