"""The artifact's bit section: fixed-width fields and Exp-Golomb codes, written MSB first (`BitWriter`) and read
back one at a time or, for long runs, many at once with numpy (`BitReader`)."""

from __future__ import annotations

import re

import numpy as np


class BitWriter:
    """MSB-first bit packing for tables and small fixed-width arrays."""

    def __init__(self):
        self._parts: list[str] = []
        self.nbits = 0

    def write(self, value: int, nbits: int) -> None:
        if nbits:
            self._parts.append(format(int(value), f"0{nbits}b"))
            self.nbits += nbits

    def write_exp_golomb(self, n: int, k: int = 0) -> None:
        m = int(n) + (1 << k)
        self.write(0, m.bit_length() - 1 - k)
        self.write(m, m.bit_length())

    def getvalue(self) -> bytes:
        bits = "".join(self._parts)
        bits += "0" * (-len(bits) % 8)
        return int(bits, 2).to_bytes(len(bits) // 8, "big") if bits else b""


class BitReader:
    """MSB-first reads from the bit section's bytes as they are (no copy, no per-bit expansion)."""

    def __init__(self, data: bytes):
        self._data, self._nbits = data, 8 * len(data)
        self.pos = 0

    @property
    def remaining(self) -> int:
        return self._nbits - self.pos

    def read(self, nbits: int) -> int:
        if nbits < 0 or self.pos + nbits > self._nbits:
            raise ValueError("bit section ends early")
        if nbits == 0:
            return 0
        first, last = self.pos >> 3, (self.pos + nbits + 7) >> 3
        word = int.from_bytes(self._data[first:last], "big")
        self.pos += nbits
        return (word >> (8 * last - self.pos)) & ((1 << nbits) - 1)

    def read_exp_golomb(self, k: int = 0) -> int:
        one = self._next_one()
        zeros = one - self.pos
        self.pos = one
        return self.read(zeros + k + 1) - (1 << k)

    def _next_one(self) -> int:
        """Position of the first 1 bit at or after pos (a regex scan: C speed, no copy)."""
        byte = self.pos >> 3
        if byte < len(self._data) and self._data[byte] & (0xFF >> (self.pos & 7)):
            return 8 * byte + 8 - (self._data[byte] & (0xFF >> (self.pos & 7))).bit_length()
        found = _NONZERO.search(self._data, byte + 1)
        if found is None:
            raise ValueError("bit section ends early")
        return 8 * found.start() + 8 - self._data[found.start()].bit_length()

    def _bits(self, count: int) -> np.ndarray:
        """The next `count` bits (at most) as a uint8 array of 0/1, without moving pos."""
        first = self.pos >> 3
        raw = np.frombuffer(
            self._data, dtype=np.uint8, count=min(len(self._data) - first, (count + 15) >> 3), offset=first
        )
        return np.unpackbits(raw)[self.pos & 7 :][:count]

    def read_many(self, n: int, nbits: int) -> np.ndarray:
        """n values of nbits bits each (nbits <= 62), as int64."""
        if n * nbits > self.remaining:
            raise ValueError("bit section ends early")
        out = np.zeros(n, dtype=np.int64)
        step = max(1, CHUNK_BITS // max(nbits, 1))  # values a chunk: its bits as one byte each, ~256 KB
        for start in range(0, n if nbits else 0, step):
            m = min(step, n - start)
            bits = self._bits(m * nbits).reshape(m, nbits)
            for i in range(nbits):
                out[start : start + m] = (out[start : start + m] << 1) | bits[:, i]
            self.pos += m * nbits
        return out

    def read_exp_golomb_many(self, count: int, k: int, limit: int) -> np.ndarray:
        """`count` Exp-Golomb codes of order k, each at most `limit`; ValueError on a longer code.

        Read in chunks of CHUNK_BITS (~20 MB of work arrays at most, whatever the count): linear in the bits
        read."""
        out, done = np.zeros(count, dtype=np.int64), 0
        longest = 2 * (limit + (1 << k)).bit_length() - 1 - k
        while done < count:
            bits = self._bits(min(CHUNK_BITS, (count - done) * longest + 8))
            got = _exp_golomb_chain(bits, k, count - done, longest)
            if got is None:
                raise ValueError("frequency table is corrupt" if len(bits) > longest else "bit section ends early")
            values, used = got
            out[done : done + len(values)] = values
            done, self.pos = done + len(values), self.pos + used
        return out


_NONZERO = re.compile(rb"[^\x00]")
CHUNK_BITS = 1 << 18
SEGMENT = 256  # longer than any code a table may hold (~2 x 21 bits at precision 20)


def _exp_golomb_chain(bits: np.ndarray, k: int, want: int, longest: int) -> tuple[np.ndarray, int] | None:
    """(values, bits used) of up to `want` whole codes from bits[0]; None when not even the first is whole
    and at most `longest` (< SEGMENT) bits.

    Every position is parsed as if a code started there (numpy), then the chain of real code starts is found
    segment by segment: each segment's chain is followed from its first bit, all segments at once; a code
    chain re-synchronises within a few codes, so the chain entering a segment almost always lands on that
    segment's chain and takes the rest of it as it is (else the segment is followed again from there)."""
    size = len(bits)
    idx = np.arange(size + 1, dtype=np.int64)
    nxt = np.full(size + 1, size, dtype=np.int64)
    ones = np.flatnonzero(bits)
    nxt[ones] = ones
    nxt = np.minimum.accumulate(nxt[::-1])[::-1]
    end = 2 * nxt - idx + k + 1  # z zeros, the 1, then z + k bits
    ok = (nxt < size) & (end <= size) & (end - idx <= longest)
    jump = np.where(ok, end, idx)  # where no whole code starts, the chain stops
    heads = np.arange(0, size, SEGMENT)
    tails = np.minimum(heads + SEGMENT, size)
    pos, mark = heads.copy(), np.zeros(size + 1, dtype=bool)
    for _ in range(SEGMENT):
        inside = pos < tails
        if not inside.any():
            break
        mark[pos[inside]] = True
        pos = np.where(inside, jump[pos], pos)
    _join_segments(mark, pos.tolist(), ok, jump)
    starts = np.flatnonzero(mark[:size])
    bad = ~ok[starts]
    starts = starts[: min(want, int(np.argmax(bad)) if bad.any() else len(starts))]
    if len(starts) == 0:
        return None
    first = nxt[starts]  # each value's bits start at its leading 1
    length = end[starts] - first
    values = np.zeros(len(starts), dtype=np.int64)
    for i in range(int(length.max())):
        values = np.where(i < length, (values << 1) | bits[np.minimum(first + i, size - 1)], values)
    return values - (1 << k), int(jump[starts[-1]])


def _join_segments(mark: np.ndarray, exits: list[int], ok: np.ndarray, jump: np.ndarray) -> None:
    """Leave marked only the chain from bit 0: each segment's marks from where the chain enters it."""
    size, entry = len(ok) - 1, 0
    for c, exit_ in enumerate(exits):
        lo, hi = c * SEGMENT, min(c * SEGMENT + SEGMENT, size)
        if not mark[entry]:  # the chain did not land on this segment's chain: follow it here by hand
            mark[lo:hi] = False
            exit_ = entry
            while exit_ < hi and ok[exit_]:
                mark[exit_] = True
                exit_ = int(jump[exit_])
        mark[lo:entry] = False
        if exit_ < hi:  # the chain stops inside this segment (no whole code at exit_)
            mark[exit_] = True
            mark[exit_ + 1 :] = False
            return
        entry = exit_


def exp_golomb_bits(n: np.ndarray, k: int) -> np.ndarray:
    m = n.astype(np.int64) + (1 << k)
    return 2 * (np.floor(np.log2(m)).astype(np.int64) + 1) - 1 - k
