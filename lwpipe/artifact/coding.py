"""Entropy coding of the artifact's symbol streams (gaps, codebook indices, quantized levels).

Why constriction: Huffman coding spends a whole number of bits per symbol, up to
~13% over the entropy when one symbol dominates, as index gaps and cluster
indices often do. Asymmetric numeral systems (ANS) spend fractional bits and
land within a few bits *per file* of the information content. constriction
(Bamler lab; Rust core, numpy bindings, MIT/Apache) is a maintained,
well-tested ANS and range coder, so the project does not carry its own.

Each stream is i.i.d. symbols 0..K-1 under a static categorical model built
from the stream's own histogram. The histogram is quantized to integer
frequencies summing to 2^L, with L chosen per stream to minimise
table bits + coded bits; the table is written as Exp-Golomb codes into the bit
section. Such frequencies are exact in constriction's 24-bit fixed point, so
the coder uses them unchanged. All streams of a file share one ANS coder (one
flush per file); a stream with a single distinct symbol costs only its table.
"""

from __future__ import annotations

import functools
import re

import numpy as np
from constriction import stream

AnsCoder = stream.stack.AnsCoder
Categorical = stream.model.Categorical

MAX_PRECISION = 20  # bits of the frequency table; constriction's coder has 24
UNIFORM_PRECISION = 20
UNIFORM_LIMIT = 1 << (UNIFORM_PRECISION - 4)  # the widest alphabet a uniform table serves


# -- bits --------------------------------------------------------------------------------
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


# -- frequency tables --------------------------------------------------------------------
def normalize(counts: np.ndarray, precision: int) -> np.ndarray:
    """Integer frequencies summing to 2^precision, >= 1 wherever counts > 0, close to the histogram."""
    total, live = 1 << precision, counts > 0
    f = np.where(live, np.maximum(1, np.rint(counts * (total / counts.sum()))), 0).astype(np.int64)
    while (diff := total - int(f.sum())) != 0:  # greedy fix-up by the cheapest change in coded bits
        if diff > 0:
            gain = np.where(live, counts * np.log2((f + 1) / np.maximum(f, 1)), -np.inf)
            pick = np.argsort(-gain, kind="stable")[: min(diff, int(live.sum()))]
            f[pick] += 1
        else:
            loss = np.where(f > 1, counts * np.log2(np.maximum(f, 2) / np.maximum(f - 1, 1)), np.inf)
            pick = np.argsort(loss, kind="stable")[: min(-diff, int((f > 1).sum()))]
            f[pick] -= 1
    return f


def table_cost(f: np.ndarray) -> tuple[int, int]:
    """(bits, Exp-Golomb order) of the cheapest encoding of the table (the last frequency is implied)."""
    head = int(exp_golomb_bits(np.array([len(f)]), 0)[0]) + 5 + 4
    orders = np.arange(16)
    m = f[:-1, None].astype(np.int64) + (1 << orders)
    costs = (2 * (np.floor(np.log2(m)).astype(np.int64) + 1) - 1 - orders).sum(0)
    k = int(np.argmin(costs))
    return head + int(costs[k]), k


@functools.lru_cache(maxsize=64)
def uniform_table(size: int) -> np.ndarray:
    """Near-equal frequencies over 0..size-1: for short streams over wide alphabets, where a table costs more
    than it saves."""
    f = normalize(np.ones(size, dtype=np.int64), UNIFORM_PRECISION)
    f.flags.writeable = False  # shared by every caller
    return f


def choose_table(counts: np.ndarray) -> tuple[np.ndarray, int, int, float]:
    """(frequencies, precision, EG order, total bits) minimising table bits + coded bits.

    precision -1 marks the uniform table (no frequencies stored)."""
    live = int((counts > 0).sum())
    if live == 1:
        f = (counts > 0).astype(np.int64)
        bits, k = table_cost(f)
        return f, 0, k, float(bits + 1)
    best = (None, 0, 0, np.inf)
    if len(counts) <= UNIFORM_LIMIT:
        f = uniform_table(len(counts))
        head = int(exp_golomb_bits(np.array([len(f)]), 0)[0]) + 1
        best = (f, -1, 0, head - float((counts * np.log2(f / (1 << UNIFORM_PRECISION))).sum()))
    previous, rising = np.inf, 0
    for precision in range(int(np.ceil(np.log2(live))) + 1, MAX_PRECISION + 1):
        f = normalize(counts, precision)
        coded = -float((counts[f > 0] * np.log2(f[f > 0] / (1 << precision))).sum())
        bits, k = table_cost(f)
        total = bits + 1 + coded
        if total < best[3]:
            best = (f, precision, k, total)
        rising = rising + 1 if total >= previous else 0
        previous = total
        if rising == 2:  # past the best precision: finer tables only cost more
            break
    return best


def estimate_bits(symbols: np.ndarray) -> float:
    """Table + coded bits the stream would cost (for choosing between encodings)."""
    if len(symbols) == 0:
        return 0.0
    return choose_table(np.bincount(symbols))[3]


def entropy_bits(symbols: np.ndarray) -> float:
    """N x empirical entropy of the stream, in bits."""
    if len(symbols) == 0:
        return 0.0
    c = np.bincount(symbols)
    c = c[c > 0]
    return float(-(c * np.log2(c / c.sum())).sum())


# -- streams -------------------------------------------------------------------------------
class StreamWriter:
    """Collects streams in order: tables go to the bit section now, symbols to one ANS coder at finish()."""

    def __init__(self):
        self.bits = BitWriter()
        self._queue: list[tuple[np.ndarray, Categorical, dict]] = []
        self.stats: list[dict] = []

    def symbols(self, symbols: np.ndarray, label: str = "") -> None:
        symbols = np.asarray(symbols)
        if symbols.dtype.kind not in "iu":
            symbols = symbols.astype(np.int64)
        if len(symbols) and symbols.dtype.kind == "i" and symbols.min() < 0:
            raise ValueError("symbols must be >= 0")
        counts = np.bincount(symbols) if len(symbols) else np.zeros(0, dtype=np.int64)
        live_counts = counts[counts > 0]
        entropy = float(-(live_counts * np.log2(live_counts / live_counts.sum())).sum()) if len(symbols) else 0.0
        stat = {
            "label": label,
            "n": len(symbols),
            "table_bits": 0,
            "coded_bits": 0,
            "entropy_bits": entropy,
            "alphabet": len(counts),
        }
        self.stats.append(stat)
        if len(symbols) == 0:
            return
        f, precision, k, _ = choose_table(counts)
        start = self.bits.nbits
        self.bits.write_exp_golomb(len(f))
        self.bits.write(precision < 0, 1)
        if precision < 0:
            precision = UNIFORM_PRECISION
        else:
            self.bits.write(precision, 5)
            self.bits.write(k, 4)
            for v in f[:-1]:
                self.bits.write_exp_golomb(v, k)
        stat["table_bits"] = self.bits.nbits - start
        live = f > 0
        if live.sum() > 1:
            # queued at the narrowest width (a 124 M-weight model queues ~10^8 symbols); int32 at finish()
            narrow = np.uint8 if live.sum() <= 256 else np.uint16 if live.sum() <= 1 << 16 else np.int32
            ranks = symbols.astype(narrow) if live.all() else (np.cumsum(live) - 1).astype(narrow)[symbols]
            model = Categorical(f[live] / float(1 << precision), perfect=False)
            self._queue.append((ranks, model, stat))

    def finish(self) -> tuple[bytes, bytes]:
        """(bit section, ANS words as little-endian uint32)."""
        coder = AnsCoder()
        for ranks, model, stat in reversed(self._queue):  # a stack: encode backwards, decode forwards
            before = coder.num_valid_bits()
            coder.encode_reverse(ranks.astype(np.int32), model)
            stat["coded_bits"] = coder.num_valid_bits() - before
        self._queue.clear()
        words = coder.get_compressed().astype("<u4").tobytes()
        return self.bits.getvalue(), words


class StreamReader:
    """Reads streams back in the order they were written."""

    def __init__(self, bits: bytes, words: bytes):
        self.bits = BitReader(bits)
        self._coder = AnsCoder(np.frombuffer(words, dtype="<u4").astype(np.uint32))
        self.stats: list[dict] = []

    def symbols(self, n: int, alphabet: int | None = None) -> np.ndarray:
        """n symbols, each below `alphabet` (when given); ValueError when the table or the count cannot be
        what was written.

        The caller has bounded n by the layer's declared size; here the count is also held to what the
        coded bits can carry (only a stream of one repeated symbol is free), so no loop or allocation
        outgrows the file."""
        stat = {"n": n, "table_bits": 0, "coded_bits": 0}
        self.stats.append(stat)
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        start = self.bits.pos
        f, precision = self._table(alphabet, n)
        stat["table_bits"] = self.bits.pos - start
        support = np.flatnonzero(f)
        if len(support) == 1:
            return np.full(n, support[0], dtype=np.int64)
        before = self._coder.num_valid_bits()
        cheapest = -np.log2(f.max() / float(1 << precision))  # bits the likeliest symbol costs
        if n * cheapest > before + 64:  # 64: the coder's state holds bits beyond its words
            raise ValueError(
                f"a stream of {n:,} symbols needs at least {n * cheapest:,.0f} coded bits, {before:,} are left"
            )
        ranks = self._coder.decode(Categorical(f[support] / float(1 << precision), perfect=False), n)
        stat["coded_bits"] = before - self._coder.num_valid_bits()
        return ranks if len(support) == len(f) else support[ranks]  # every symbol live: ranks are the symbols

    def _table(self, alphabet: int | None, n: int) -> tuple[np.ndarray, int]:
        """The stream's frequencies, bounded by its symbol count n: a stored table costs less than the
        uniform one it replaces (~n x log2(size) bits, choose_table), so it has fewer than 16 n + 64 entries
        when the uniform table was possible; above that size it has at most n symbols live."""
        size = self.bits.read_exp_golomb()
        if size < 1 or (alphabet is not None and size > alphabet):
            raise ValueError(f"frequency table of {size:,} symbols for an alphabet of {alphabet:,}")
        if self.bits.read(1):
            if size > UNIFORM_LIMIT:  # the writer's own limit (choose_table)
                raise ValueError(f"uniform table of {size:,} symbols")
            return uniform_table(size), UNIFORM_PRECISION
        precision, k = self.bits.read(5), self.bits.read(4)
        if size <= UNIFORM_LIMIT and size > 16 * n + 64:
            raise ValueError(
                f"frequency table of {size:,} symbols for a stream of {n:,}: it costs more than "
                "the uniform table (no writer stores it)"
            )
        if precision > MAX_PRECISION or (size - 1) * (k + 1) > self.bits.remaining:  # each takes >= k + 1 bits
            raise ValueError("frequency table is corrupt")
        f = np.zeros(size, dtype=np.int64)
        f[:-1] = self.bits.read_exp_golomb_many(size - 1, k, 1 << precision)  # a longer code is refused
        rest = (1 << precision) - int(f.sum())
        if rest < 1 or f.max() > 1 << precision:
            raise ValueError("frequency table is corrupt")
        f[-1] = rest
        if np.count_nonzero(f) > n:
            raise ValueError(f"frequency table with {np.count_nonzero(f):,} live symbols for a stream of {n:,}")
        return f, precision

    def done(self) -> bool:
        return self._coder.is_empty()
