"""The entropy coder lands within 1% of each stream's empirical entropy plus its table; parts round-trip."""

import numpy as np
import pytest
import torch

from lwpipe.artifact.coding import BitReader, BitWriter, StreamReader, StreamWriter, entropy_bits
from lwpipe.artifact.positions import choose_escape, gap_symbols, positions_from_gaps
from lwpipe.artifact.raw import FLOAT_FIELDS, join_float, split_float

RNG = np.random.default_rng(0)
STREAMS = {
    "gaps at 8% kept": RNG.geometric(0.08, 4000) - 1,
    "one symbol at 95%": RNG.choice(4, 20000, p=[0.95, 0.03, 0.015, 0.005]),  # Huffman's worst case
    "64 clusters": RNG.choice(64, 5000, p=RNG.dirichlet(np.ones(64))),
    "8-bit levels": np.clip(np.rint(RNG.laplace(128, 12, 8000)), 0, 255).astype(np.int64),
}


def code(streams):
    w = StreamWriter()
    for s in streams:
        w.symbols(s)
    bits, words = w.finish()
    r = StreamReader(bits, words)
    out = [r.symbols(len(s)) for s in streams]
    assert r.done()
    return w.stats, out, 8 * (len(bits) + len(words))


@pytest.mark.parametrize("name", list(STREAMS))
def test_each_stream_is_within_one_percent_of_entropy_plus_table(name):
    stats, (out,), _ = code([STREAMS[name]])
    assert np.array_equal(out, STREAMS[name])
    s = stats[0]
    assert s["coded_bits"] <= 1.01 * s["entropy_bits"] + 64  # 64: the coder's final state, once per file
    assert s["coded_bits"] + s["table_bits"] <= 1.01 * (s["entropy_bits"] + s["table_bits"]) + 64


def test_a_dominant_symbol_costs_far_below_one_bit():
    """A prefix (Huffman) code needs >= 1 bit per symbol; the entropy here is ~0.35."""
    stats, _, total = code([STREAMS["one symbol at 95%"]])
    assert total < 0.4 * len(STREAMS["one symbol at 95%"])


def test_many_streams_share_one_coder_and_come_back_in_order():
    streams = list(STREAMS.values()) + [np.zeros(0, dtype=np.int64), np.full(50, 7), np.arange(3)]
    stats, out, total = code(streams)
    assert all(np.array_equal(a, b) for a, b in zip(out, streams))
    assert total <= sum(s["coded_bits"] + s["table_bits"] for s in stats) + 64
    assert stats[-2]["coded_bits"] == 0  # a single distinct symbol costs only its table


def test_short_stream_over_a_wide_alphabet_skips_the_table():
    stats, _, _ = code([RNG.integers(0, 256, 100)])
    assert stats[0]["table_bits"] < 20  # a 256-entry table would cost more than it saves


@pytest.mark.parametrize("density", [0.0, 0.001, 0.08, 0.5, 1.0])
def test_positions_round_trip(density):
    size = 5000
    positions = np.flatnonzero(RNG.random(size) < density)
    escape, symbols = choose_escape(positions)
    assert np.array_equal(positions_from_gaps(symbols, escape, len(positions), size), positions)


def test_escape_keeps_the_alphabet_small():
    positions = np.array([3, 70_000, 70_001, 200_000])
    symbols = gap_symbols(positions, 15)
    assert symbols.max() == 15 and np.array_equal(positions_from_gaps(symbols, 15, 4, 200_001), positions)
    with pytest.raises(ValueError, match="does not fit"):
        positions_from_gaps(symbols, 15, 4, 100_000)


@pytest.mark.parametrize("dtype", list(FLOAT_FIELDS))
def test_float_fields_round_trip_exactly(dtype):
    t = (torch.randn(500) * 0.05).to(dtype)
    t[:4] = torch.tensor([0.0, -0.0, float("inf"), float("nan")]).to(dtype)
    symbols, low, mantissa = split_float(t)
    back = join_float(symbols, low, mantissa, dtype)
    as_int = FLOAT_FIELDS[dtype][2]
    assert torch.equal(back.view(as_int), t.view(as_int))
    assert entropy_bits(symbols) / len(t) < 5  # sign + exponent of weight-like values: a few bits


def test_bits_round_trip():
    w = BitWriter()
    for v, n in [(5, 3), (0, 1), (1023, 10)]:
        w.write(v, n)
    for n in [0, 1, 17, 1000]:
        w.write_exp_golomb(n, 2)
    r = BitReader(w.getvalue())
    assert [r.read(3), r.read(1), r.read(10)] == [5, 0, 1023]
    assert [r.read_exp_golomb(2) for _ in range(4)] == [0, 1, 17, 1000]


def test_streams_coded_in_pieces_are_the_same_bits_and_decode_narrow(monkeypatch):
    """Long streams are coded and decoded DECODE_CHUNK symbols at a time (no int32 / int64 copy of a
    65 M-symbol stream): the same words as one piece, and the same symbols in the dtype asked for."""
    import lwpipe.artifact.coding as coding

    streams = [STREAMS["64 clusters"], STREAMS["8-bit levels"], RNG.choice([3, 9], 3001)]  # [3, 9]: ranks != symbols
    one = StreamWriter()
    for s in streams:
        one.symbols(s)
    whole = one.finish()
    monkeypatch.setattr(coding, "DECODE_CHUNK", 97)
    pieces = StreamWriter()
    for s in streams:
        pieces.symbols(s)
    assert pieces.finish() == whole
    r = StreamReader(*whole)
    out = [r.symbols(len(s), dtype=np.int16) for s in streams]
    assert all(o.dtype == np.int16 and np.array_equal(o, s) for o, s in zip(out, streams))
    assert r.done()
