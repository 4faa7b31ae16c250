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

import numpy as np
from constriction import stream

from lwpipe.artifact.bits import BitReader, BitWriter, exp_golomb_bits  # noqa: F401  (re-exported)

AnsCoder = stream.stack.AnsCoder
Categorical = stream.model.Categorical

MAX_PRECISION = 20  # bits of the frequency table; constriction's coder has 24
UNIFORM_PRECISION = 20
UNIFORM_LIMIT = 1 << (UNIFORM_PRECISION - 4)  # the widest alphabet a uniform table serves
DECODE_CHUNK = 1 << 20  # symbols coded or decoded at a time (int32 copies of that many, not of a stream)


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

    def symbols(self, symbols: np.ndarray, label: str = "", again=None) -> None:
        """Queue a stream; `again()`, when given, gives the very same symbols once more at finish(), so the
        queue holds that callable instead of the symbols (an encoding then holds no copy of a large model's
        levels: it computes them twice)."""
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

            def ranked(x: np.ndarray) -> np.ndarray:
                return x.astype(narrow) if live.all() else (np.cumsum(live) - 1).astype(narrow)[x]

            model = Categorical(f[live] / float(1 << precision), perfect=False)
            queued = ranked(symbols) if again is None else (lambda: ranked(np.asarray(again())))
            self._queue.append((queued, model, stat))

    def finish(self) -> tuple[bytes, bytes]:
        """(bit section, ANS words as little-endian uint32)."""
        bits, words = self.finish_words()
        return bits, words.tobytes()

    def finish_words(self) -> tuple[bytes, np.ndarray]:
        """finish() with the ANS words as a little-endian uint32 array (not copied into bytes)."""
        coder = AnsCoder()
        for ranks, model, stat in reversed(self._queue):  # a stack: encode backwards, decode forwards
            ranks = ranks() if callable(ranks) else ranks
            before = coder.num_valid_bits()
            for i in reversed(range(0, len(ranks), DECODE_CHUNK)):  # the last piece first: a stack
                coder.encode_reverse(ranks[i : i + DECODE_CHUNK].astype(np.int32), model)
            stat["coded_bits"] = coder.num_valid_bits() - before
        self._queue.clear()
        return self.bits.getvalue(), np.asarray(coder.get_compressed(), dtype="<u4")


class StreamReader:
    """Reads streams back in the order they were written."""

    def __init__(self, bits: bytes, words: bytes):
        self.bits = BitReader(bits)
        self._coder = AnsCoder(np.frombuffer(words, dtype="<u4").astype(np.uint32, copy=False))  # the coder copies
        self.stats: list[dict] = []

    def symbols(self, n: int, alphabet: int | None = None, dtype=np.int64) -> np.ndarray:
        """n symbols (as `dtype`), each below `alphabet` (when given); ValueError when the table or the count
        cannot be what was written. Decoded DECODE_CHUNK at a time into the result: a 65 M-value table's
        sign+exponent stream asked for as int16 takes 130 MB, not 520 MB of int64 and 260 MB of int32 ranks.

        The caller has bounded n by the layer's declared size; here the count is also held to what the
        coded bits can carry (only a stream of one repeated symbol is free), so no loop or allocation
        outgrows the file."""
        stat = {"n": n, "table_bits": 0, "coded_bits": 0}
        self.stats.append(stat)
        if n == 0:
            return np.zeros(0, dtype=dtype)
        start = self.bits.pos
        f, precision = self._table(alphabet, n)
        stat["table_bits"] = self.bits.pos - start
        support = np.flatnonzero(f)
        if len(support) == 1:
            return np.full(n, support[0], dtype=dtype)
        before = self._coder.num_valid_bits()
        cheapest = -np.log2(f.max() / float(1 << precision))  # bits the likeliest symbol costs
        if n * cheapest > before + 64:  # 64: the coder's state holds bits beyond its words
            raise ValueError(
                f"a stream of {n:,} symbols needs at least {n * cheapest:,.0f} coded bits, {before:,} are left"
            )
        model, out = Categorical(f[support] / float(1 << precision), perfect=False), np.empty(n, dtype=dtype)
        every = len(support) == len(f)  # every symbol live: the ranks are the symbols
        for i in range(0, n, DECODE_CHUNK):  # ANS decodes in order: pieces give the same symbols as one call
            ranks = self._coder.decode(model, min(DECODE_CHUNK, n - i))
            out[i : i + len(ranks)] = ranks if every else support[ranks]
        stat["coded_bits"] = before - self._coder.num_valid_bits()
        return out

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
