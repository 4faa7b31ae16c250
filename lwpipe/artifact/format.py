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


def unpack(data: bytes, source: str = "artifact") -> tuple[dict, bytes]:
    """(header, body) of a whole file; ArtifactError naming what is wrong."""
    if not data:
        raise ArtifactError(f"{source} is empty, not an lwpipe artifact")
    if len(data) < 4 and MAGIC.startswith(bytes(data)):
        raise ArtifactError(f"{source} is truncated: {len(data)} bytes, cut inside the magic number")
    if data[:4] != MAGIC:
        raise ArtifactError(f"{source} is not an lwpipe artifact: it starts with {bytes(data[:4])!r}, "
                            f"an artifact with {MAGIC!r}")
    if len(data) < 5:
        raise ArtifactError(f"{source} is truncated: {len(data)} bytes, not even the format version")
    if not FIRST_VERSION <= data[4] <= VERSION:
        newer = "a newer lwpipe; upgrade lwpipe" if data[4] > VERSION else "an older lwpipe"
        raise ArtifactError(f"{source} has format version {data[4]}, this lwpipe reads versions "
                            f"{FIRST_VERSION}..{VERSION} (the file was written by {newer})")
    try:
        size, pos = _read_leb128(data, 5)
    except ValueError:
        raise ArtifactError(f"{source} is truncated: {len(data)} bytes, cut inside the length field") from None
    if len(data) < size:
        raise ArtifactError(f"{source} is truncated: {len(data)} of {size} bytes")
    if len(data) > size:
        raise ArtifactError(f"{source} has {len(data) - size} unexpected bytes after its end (at byte {size})")
    if zlib.crc32(data[:-4]) != int.from_bytes(data[-4:], "little"):
        raise ArtifactError(f"{source} is damaged: its CRC-32 checksum does not match its contents "
                            "(the file was altered or corrupted after it was written)")
    try:
        length, pos = _read_leb128(data, pos)
        header = json.loads(_inflate(data[pos:pos + length]))
    except (ValueError, zlib.error) as e:
        raise ArtifactError(f"{source} has an unreadable header: {e}") from None
    except RecursionError:
        raise ArtifactError(f"{source} has an unreadable header: JSON nested too deeply") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{source} has an unreadable header: not a JSON object")
    return header, data[pos + length:-4]
