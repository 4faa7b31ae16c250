"""The `.lwp` container: magic, version, length, JSON header, body, CRC-32. No pickle anywhere.

    offset  size  field
    0       4     magic b"\\x89LWP" (the high byte catches 7-bit and text-mode transfers, as PNG's does)
    4       1     format version (VERSION)
    5       var   total file length in bytes (LEB128): a cut-off file is named as truncated
    .       var   header length in bytes (LEB128)
    .       n     header: UTF-8 JSON, raw-deflated with the preset dictionary HEADER_WORDS
                  (the model config and every layer's encoding; ~130 bytes for LeNet-300-100)
    .       ...   body: raw section | bit section | ANS words (sizes in header["sections"])
    end-4   4     CRC-32 (little-endian) of every byte before it

The checksum catches accidental damage (any single flipped byte, any cut); it
is not a signature. Loading never runs code from the file: the header is JSON
and the model is built only from an allowlist (see decode.py).
"""

from __future__ import annotations

import json
import mmap
import os
import stat
import zlib

from lwpipe.errors import LwpipeError

MAGIC = b"\x89LWP"
VERSION = 2  # 2: grids may have per-group scales ("group" in a layer's grid). Files without them are written as 1,
FIRST_VERSION = 1  # so that an older lwpipe still reads them; this lwpipe reads both.
# Deflate's preset dictionary: the words every header repeats, so that a small model's header
# costs ~130 bytes instead of ~360. Part of format version 1: changing it needs a new VERSION.
HEADER_WORDS = (
    b'"_target_":"lwpipe.models.LeNet5","in_channels":1,"image_size":28,"padding":null,'
    b'"lwpipe.models.TinyMLP","hidden":16,"lwpipe.models.LeNet300","in_features":784,"num_classes":10},'
    b'"dense_bytes":,"layers":[{"name":"conv1.weight","shape":[20,1,5,5],"dtype":"float32",'
    b'"mask":{"nnz":,"gaps":,"escape":1},"values":["float32",]},{"name":"conv2.weight","shape":[50,20,5,5],'
    b'"quant":{"bits":8,"qmin":-127,"qmax":127,"axis":0,"scale":[["float32",],[]],"zp":[0,[]]},"fc3.weight"'
    b'"shared":{"k":32,"codebook":"levels"}},{"name":"fc2.weight","shape":[100,300],"dtype":"float32",'
    b'"mask":{"nnz":,"gaps":,"escape":1},"quant":{"bits":8,"qmin":-127,"qmax":127,"axis":null,'
    b'"scale":[["float32",],[]],"zp":[0,[]]},"shared":{"k":32,"codebook":"levels"}}],"tensors":['
    b'["conv1.bias",["float32"],[20],"float32"],["fc2.bias",["float16",],[100],"float32","half"],'
    b'["fc1.bias",["float16",],[300],"float32","half"]],"sections":['
)


# A header is ~150 bytes of JSON per stored tensor: 16 MiB holds ~100,000 tensors.
MAX_HEADER = 16 << 20
# deflate adds at most 5 bytes per 16 KiB stored block: a header's compressed form is below this
MAX_DEFLATED = MAX_HEADER + MAX_HEADER // 1000 + 1024


class ArtifactError(LwpipeError):
    """A file that is not a readable lwpipe artifact; the message says why."""


def _leb128(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_leb128(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos
    raise ValueError("length field is cut off")


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15, zdict=HEADER_WORDS)
    return c.compress(data) + c.flush()


def _inflate(data: bytes) -> bytes:
    d = zlib.decompressobj(-15, zdict=HEADER_WORDS)
    out = d.decompress(data, MAX_HEADER)  # capped: a few KB of deflate can inflate to gigabytes
    if d.unconsumed_tail or len(out) >= MAX_HEADER:
        raise ValueError(f"it inflates to more than {MAX_HEADER:,} bytes (the most a header may take)")
    if not d.eof:
        raise ValueError("the compressed header is cut off")
    return out


def pack(header: dict, body: bytes, version: int = FIRST_VERSION) -> bytes:
    return pack_json(json.dumps(header, separators=(",", ":")).encode(), body, version)


def pack_json(header: bytes, body: bytes, version: int = FIRST_VERSION) -> bytes:
    head = _deflate(header)
    rest = _leb128(len(head)) + head + body
    prefix = MAGIC + bytes([version])
    size = len(prefix) + len(rest) + 4
    while len(prefix) + len(_leb128(size)) + len(rest) + 4 != size:  # the length counts its own bytes
        size = len(prefix) + len(_leb128(size)) + len(rest) + 4
    data = prefix + _leb128(size) + rest
    return data + zlib.crc32(data).to_bytes(4, "little")


def _prefix(data: bytes, source: str) -> tuple[int, int]:
    """(declared file length, offset of the header length) from the first bytes of a file."""
    if not data:
        raise ArtifactError(f"{source} is empty, not an lwpipe artifact")
    if len(data) < 4 and MAGIC.startswith(bytes(data)):
        raise ArtifactError(f"{source} is truncated: {len(data)} bytes, cut inside the magic number")
    if data[:4] != MAGIC:
        raise ArtifactError(
            f"{source} is not an lwpipe artifact: it starts with {bytes(data[:4])!r}, an artifact with {MAGIC!r}"
        )
    if len(data) < 5:
        raise ArtifactError(f"{source} is truncated: {len(data)} bytes, not even the format version")
    if not FIRST_VERSION <= data[4] <= VERSION:
        newer = "a newer lwpipe; upgrade lwpipe" if data[4] > VERSION else "an older lwpipe"
        raise ArtifactError(
            f"{source} has format version {data[4]}, this lwpipe reads versions "
            f"{FIRST_VERSION}..{VERSION} (the file was written by {newer})"
        )
    try:
        return _read_leb128(data, 5)
    except ValueError:
        raise ArtifactError(f"{source} is truncated: {len(data)} bytes, cut inside the length field") from None


def _check_length(have: int, size: int, source: str) -> None:
    if have < size:
        raise ArtifactError(f"{source} is truncated: {have} of {size} bytes")
    if have > size:
        raise ArtifactError(f"{source} has {have - size} unexpected bytes after its end (at byte {size})")


def _header(data: bytes, pos: int, source: str) -> tuple[dict, int]:
    """(header, offset of the body): the header's compressed bytes start at data[pos] with their length."""
    try:
        length, pos = _read_leb128(data, pos)
        if length > MAX_DEFLATED:
            raise ValueError(f"it takes {length:,} compressed bytes, more than a header may ({MAX_DEFLATED:,})")
        if pos + length > len(data):
            raise ValueError("the compressed header is cut off")
        header = json.loads(_inflate(data[pos : pos + length]))
    except (ValueError, zlib.error) as e:
        raise ArtifactError(f"{source} has an unreadable header: {e}") from None
    except RecursionError:
        raise ArtifactError(f"{source} has an unreadable header: JSON nested too deeply") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{source} has an unreadable header: not a JSON object")
    return header, pos + length


def unpack(data: bytes, source: str = "artifact", view: bool = False) -> tuple[dict, bytes]:
    """(header, body) of a whole file; ArtifactError naming what is wrong. `view`: the body as a memoryview
    of `data` (no copy)."""
    size, pos = _prefix(data, source)
    _check_length(len(data), size, source)
    if crc32(data) != int.from_bytes(data[-4:], "little"):
        raise ArtifactError(
            f"{source} is damaged: its CRC-32 checksum does not match its contents "
            "(the file was altered or corrupted after it was written)"
        )
    header, start = _header(data, pos, source)
    return header, (memoryview(data) if view else data)[start:-4]


def crc32(data) -> int:
    """CRC-32 of all but the last 4 bytes, read in place (no copy of the body); a mapped file's pages are
    dropped from the process as they are checked (drop_pages)."""
    view, crc, step = memoryview(data)[:-4], 0, 64 << 20
    for i in range(0, len(view), step):
        crc = zlib.crc32(view[i : i + step], crc)
        drop_pages(data, i, min(step, len(view) - i))
    return crc


def drop_pages(data, start: int = 0, length: int = 0) -> None:
    """Hand a mapped file's pages back (they are read again from the page cache if touched): a mapping
    that was read through would otherwise count in full in the process's RSS. Bytes: nothing to do."""
    mapped = data.obj if isinstance(data, memoryview) else data
    if isinstance(mapped, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        mapped.madvise(mmap.MADV_DONTNEED, start, length or len(mapped) - start)


def read_file(path, check, mapped: bool = False) -> bytes:
    """The bytes of an artifact file, read only after `check(header, body_length)` accepted its header.

    Anything but a regular file (a FIFO would block, /dev/zero never ends) is refused unread, as is a
    file whose length differs from the one it declares; `check` (decode's header limits) refuses a body
    longer than its declared content can take, so nothing the size of the file is allocated before."""
    source = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))  # a FIFO opens at once
    except OSError as e:
        raise ArtifactError(f"cannot read {source}: {e.strerror or e}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ArtifactError(
                f"{source} is {_kind(info.st_mode)}, not a regular file: lwpipe reads artifacts only from regular files"
            )
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb", buffering=0) as f:
        try:
            return _read_checked(f, info.st_size, source, check, mapped)
        except OSError as e:
            raise ArtifactError(f"cannot read {source}: {e.strerror or e}") from None


def _read_checked(f, size: int, source: str, check, mapped: bool = False) -> bytes:
    declared, pos = _prefix(f.read(min(size, 16)), source)
    _check_length(size, declared, source)
    f.seek(0)
    head = f.read(min(size, pos + 10 + MAX_DEFLATED))
    try:
        header, start = _header(head, pos, source)
        check(header, size - start - 4)
    except ArtifactError:
        if size <= CRC_SCAN_LIMIT:  # a damaged file is named damaged, as unpack would
            f.seek(0)
            _crc_matches(f, size, source)
        raise
    f.seek(0)
    if mapped and size:  # read where it lies: the process holds only the pages it is reading
        return mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
    return f.read(size + 1)


CRC_SCAN_LIMIT = 64 << 20  # a refused file up to this size is checked for damage first (streamed, 1 MiB at a time)


def _crc_matches(f, size: int, source: str) -> None:
    crc, left = 0, size - 4
    while left > 0:
        chunk = f.read(min(left, 1 << 20))
        if not chunk:
            break
        crc, left = zlib.crc32(chunk, crc), left - len(chunk)
    if crc != int.from_bytes(f.read(4), "little"):
        raise ArtifactError(
            f"{source} is damaged: its CRC-32 checksum does not match its contents "
            "(the file was altered or corrupted after it was written)"
        )


def _kind(mode: int) -> str:
    kinds = [
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ]
    return next((name for test, name in kinds if test(mode)), "not a regular file")
