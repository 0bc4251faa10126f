"""The shared-storage connector's files: where a block's file lives, what it holds, and how one
is read and written (plain Python and numpy; no torch).

Layout::

    <shared_storage_path>/<namespace>/<key>.r<rank>.kv       one file per block and rank
    namespace: a digest of what makes blocks interchangeable (model config, dtypes, block size,
               tensor/pipeline layout, drafter); engines that differ never read each other's
    key:       the block's chained prefix hash, sha256 (as the prefix cache's, but stable
               across processes: key_i = sha256(key_{i-1}, tokens_i, extra_i), where extra is
               the prefix cache's extra key: cache salt, LoRA adapter, images; the adapter as a
               digest of its files, never its lora_int_id, which means something in one engine)

    file:  a 128-byte header | payload (the block of every cache tensor of the rank, in order)
    header: b"TSLKV\\x00\\x02\\n", the key (64 bytes), rank (u32), checksum kind (u32: 0 none,
            1 sum64, 2 crc32), payload bytes (u64), checksum (u64), a digest of the rank's
            cache layout (16 bytes); little-endian, zero padded

A file is exactly header + payload bytes long, so a lookup checks a block with one ``stat``.
``sum64`` is the sum of the payload's 64-bit words modulo 2**64 (numpy, at memory speed: it
catches any changed word, not swapped ones); ``crc32`` is zlib's (~1 GB/s a core).

A file is written under a temporary name unique to its writer (host, process, thread) and
renamed over its final name: a reader sees a whole file or none, and two engines saving one
block at once (a shared directory) each rename a whole file; the later one wins, and both hold
the same block.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
import struct
import threading
import zlib
from typing import Optional

logger = logging.getLogger(__name__)

MAGIC = b"TSLKV\x00\x02\n"
HEADER = struct.Struct("<8s64sIIQQ16s")
HEADER_BYTES = 128  # the header, zero padded: the payload starts here
CHECKSUMS = ("none", "sum64", "crc32")
# Temporary names: this process's token (random: processes of two hosts sharing a directory
# may have equal pids), its pid (a fork keeps the token) and the writing thread.
_TMP_TOKEN = secrets.token_hex(6)


def block_path(root: str, key: str, rank: int) -> str:
    return os.path.join(root, f"{key}.r{rank}.kv")


def chain_key(parent: Optional[str], tokens, extra) -> str:
    """A block's stable prefix key: sha256 over its parent's key, its token ids and the
    prefix cache's extra key (``repr``: strings, ints and tuples of them)."""
    h = hashlib.sha256()
    h.update((parent or "").encode())
    h.update(b"\x00" + ",".join(map(str, tokens)).encode())
    h.update(b"\x00" + repr(extra).encode())
    return h.hexdigest()


def adapter_identity(path: str) -> str:
    """A LoRA adapter as the connector's keys name it: a BLAKE2b digest of the contents of
    its ``adapter_config.json`` and weights file (as ``tessellm.lora.peft`` reads them). Its
    ``lora_int_id`` is no identity across engines (two engines may bind one id to other
    files); a digest of the contents is: the same adapter in any directory, under any name or
    id, shares KV, and another one never does. A directory without those files (the request
    fails to load it) is named by its real path."""
    h = hashlib.blake2b(digest_size=16)
    found = False
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        file = os.path.join(path, name)
        try:
            with open(file, "rb") as f:
                h.update(b"\x00" + name.encode() + b"\x00")
                while chunk := f.read(1 << 24):
                    h.update(chunk)
        except OSError:
            continue
        found = found or name != "adapter_config.json"
        if name == "adapter_model.safetensors":
            break  # the .bin is read only without it
    if not found:
        return "path:" + os.path.realpath(path)
    return "files:" + h.hexdigest()


def layout_digest(caches) -> bytes:
    """The 16-byte digest of a rank's cache layout (each tensor's dtype and block shape)."""
    layout = repr([[str(t.dtype), list(t.shape[1:])] for t in caches]).encode()
    return hashlib.blake2b(layout, digest_size=16).digest()


# A missing file (or directory): a miss. Any other error of a lookup's (EIO, ESTALE,
# ENOTCONN, EACCES...) is the store's: raised, and the store counts as down.
_MISSING = (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG)
PROBE_NAME = ".tessellm-probe"  # a name no block has: opened by the probe


def loadable(path: str, block_bytes: Optional[int]) -> bool:
    """The file is there and exactly as long as a header and ``block_bytes`` (one ``stat``;
    without ``block_bytes``, as long as its header says). The header's other fields and the
    checksum are the loader's to check. Raises OSError for an error of the store's (not a
    missing file)."""
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        if exc.errno in _MISSING:
            return False
        raise
    if block_bytes:
        return size == HEADER_BYTES + block_bytes
    try:
        with open(path, "rb") as f:
            header = parse_header(f.read(HEADER_BYTES))
    except ValueError:
        return False
    except OSError as exc:
        if exc.errno in _MISSING:
            return False
        raise
    return size == HEADER_BYTES + header[3]


def probe(root: str) -> None:
    """Whether the directory answers: a ``stat`` of it and an ``open`` of a name in it that no
    block has (a lookup's work, cheap). Returns, or raises OSError; hangs where the store
    hangs (the caller runs it on a thread of its own)."""
    os.stat(root)
    try:
        fd = os.open(os.path.join(root, PROBE_NAME), os.O_RDONLY)
    except FileNotFoundError:
        return
    os.close(fd)


def read_block(path: str, key: str, rank: int, layout: bytes, block_bytes: int,
               views: list) -> Optional[tuple]:
    """The file at ``path`` into ``views`` (the payload's parts, in order): (checksum kind,
    checksum) for a whole file of this key, rank and layout (a crc32 checked here; a sum64 is
    the caller's, over many blocks at once), else None (the file removed unless it was
    missing: nobody loads it again, a producer's next save writes it afresh)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            key_raw, rank_, kind, nbytes, checksum, layout_ = parse_header(os.pread(fd, HEADER_BYTES, 0))
            if (key_raw.rstrip(b"\0") != key_bytes(key) or rank_ != rank or layout_ != layout
                    or nbytes != block_bytes or kind >= len(CHECKSUMS)):
                raise ValueError("another key or layout")
            if os.fstat(fd).st_size != HEADER_BYTES + nbytes or preadv(fd, views, HEADER_BYTES) != nbytes:
                raise ValueError("wrong length")
        finally:
            os.close(fd)
        if kind == 2 and crc32(views) != checksum:
            raise ValueError("checksum mismatch")
        return kind, checksum
    except FileNotFoundError:
        logger.warning("KV file %s is gone: the request is recomputed.", path)
    except (OSError, ValueError) as exc:
        drop(path, exc)
    return None


def drop(path: str, why) -> None:
    logger.warning("KV file %s not loaded (%s): removed; the request is recomputed.", path, why)
    try:
        os.unlink(path)  # nobody loads it again; a producer's next save writes it afresh
    except OSError:
        pass


def write_block(path: str, key: str, rank: int, checksum: str, layout: bytes, block_bytes: int,
                views: list, sum64: Optional[int]) -> None:
    """``views`` (the payload's parts, in order) as the file at ``path``: a temporary file of
    this writer's, renamed over it. Raises OSError (the temporary file removed)."""
    header = block_header(key, rank, checksum, layout, block_bytes, views, sum64)
    tmp = f"{path}.tmp{_TMP_TOKEN}.{os.getpid()}.{threading.get_ident()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            writev(fd, [memoryview(header)] + views)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def block_header(key: str, rank: int, checksum: str, layout: bytes, block_bytes: int,
                 views: list, sum64: Optional[int]) -> bytes:
    """A block's 128-byte header (its checksum over ``views``, the payload's parts, unless
    ``sum64`` is given for a sum64)."""
    kind = CHECKSUMS.index(checksum)
    value = sum64 if kind == 1 else crc32(views) if kind == 2 else 0
    return HEADER.pack(MAGIC, key_bytes(key), rank, kind, block_bytes, value,
                       layout).ljust(HEADER_BYTES, b"\0")


def check_block(raw, key: str, rank: int, layout: bytes, block_bytes: int, crc: bool = False) -> tuple:
    """A whole block as bytes (header and payload, a file's contents; any buffer) checked
    without a copy: (checksum kind, checksum). Raises ValueError for another key, rank, layout
    or length, or (``crc``) a crc32 that fails over the payload; a sum64 is the caller's."""
    raw = memoryview(raw)
    key_raw, rank_, kind, nbytes, checksum, layout_ = parse_header(bytes(raw[:HEADER_BYTES]))
    if (key_raw.rstrip(b"\0") != key_bytes(key) or rank_ != rank or layout_ != layout
            or nbytes != block_bytes or kind >= len(CHECKSUMS)):
        raise ValueError("another key or layout")
    if len(raw) != HEADER_BYTES + nbytes:
        raise ValueError("wrong length")
    if crc and kind == 2 and zlib.crc32(raw[HEADER_BYTES:]) != checksum:
        raise ValueError("checksum mismatch")
    return kind, checksum


def decode_block(raw, key: str, rank: int, layout: bytes, block_bytes: int, views: list) -> tuple:
    """A whole block as bytes (header and payload, a file's contents) into ``views``: (checksum
    kind, checksum), a crc32 checked here (a sum64 is the caller's). Raises ValueError for
    another key, rank, layout or length, or a crc32 that fails."""
    raw = memoryview(raw)
    kind, checksum = check_block(raw, key, rank, layout, block_bytes, crc=True)
    at = HEADER_BYTES
    for v in views:
        v[:] = raw[at:at + len(v)]
        at += len(v)
    return kind, checksum


def parse_header(raw: bytes) -> tuple:
    """(key bytes, rank, checksum kind, payload bytes, checksum, layout digest)."""
    if len(raw) != HEADER_BYTES or raw[:len(MAGIC)] != MAGIC:
        raise ValueError("not a tessellm KV file of this version")
    return HEADER.unpack_from(raw)[1:]


def key_bytes(key: str) -> bytes:
    raw = key.encode()
    return raw if len(raw) <= 64 else hashlib.sha256(raw).hexdigest().encode()


def crc32(parts) -> int:
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    return crc


def sum64(rows):
    """Each row's (uint8 ``[n, bytes]`` numpy) sum of 64-bit words modulo 2**64 (bytes past a
    multiple of 8 add one by one)."""
    import numpy as np

    whole = rows.shape[1] // 8 * 8
    out = rows[:, :whole].view(np.uint64).sum(axis=1, dtype=np.uint64)
    if whole < rows.shape[1]:
        out += rows[:, whole:].sum(axis=1, dtype=np.uint64)
    return out


def sum_parts(parts, run: range):
    """The sum64 of each block of ``run`` over every cache tensor's part (uint8 ``[n, bytes]``
    tensors; numpy lets the GIL go, so the pool's threads sum in parallel)."""
    total = None
    for part in parts:
        s = sum64(part.numpy()[run.start:run.stop])
        total = s if total is None else total + s  # uint64: modulo 2**64
    return total


def preadv(fd: int, views: list, offset: int) -> int:
    """Bytes read from ``offset`` into ``views`` in order (fewer only at the end of the file)."""
    total = 0
    for g in range(0, len(views), 512):  # under IOV_MAX
        group = views[g:g + 512]
        got = os.preadv(fd, group, offset + total)
        total += got
        if got != sum(len(v) for v in group):
            break
    return total


def writev(fd: int, views: list) -> None:
    """All of ``views`` written in order (a short write continues where it stopped)."""
    while views:
        group = views[:512]
        done = os.writev(fd, group)
        if done <= 0:
            raise OSError("writev wrote nothing")
        k = 0
        while k < len(group) and done >= len(group[k]):
            done -= len(group[k])
            k += 1
        views = views[k:]
        if done:
            views[0] = views[0][done:]
