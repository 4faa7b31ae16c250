"""Positions of the kept weights as relative gaps, with Deep Compression's escape for long runs.

A kept weight after g pruned ones is the symbol g. With an escape value E, a
gap g >= E is written as g // E escape symbols (each: "E pruned weights, no
kept one") followed by g % E, so the alphabet stays 0..E however sparse the
layer. E is chosen per layer for the fewest coded bits.
"""
from __future__ import annotations

import numpy as np

from lwpipe.artifact.coding import estimate_bits

MAX_ESCAPE = 1 << 16


def gap_symbols(positions: np.ndarray, escape: int | None) -> np.ndarray:
    gaps = np.diff(positions.astype(np.int64), prepend=-1) - 1
    if escape is None or len(gaps) == 0:
        return gaps
    runs, rest = np.divmod(gaps, escape)
    out = np.full(int((runs + 1).sum()), escape, dtype=np.int64)
    out[np.cumsum(runs + 1) - 1] = rest
    return out


def choose_escape(positions: np.ndarray) -> tuple[int | None, np.ndarray]:
    """(escape, symbols) with the smallest estimated coded size."""
    gaps = gap_symbols(positions, None)
    largest = int(gaps.max()) if len(gaps) else 0
    best, worse = None, 0
    for escape in [(1 << j) - 1 for j in range(1, 17) if (1 << j) - 1 <= largest] + [None] * (largest < MAX_ESCAPE):
        symbols = gap_symbols(positions, escape)
        bits = estimate_bits(symbols)
        worse = worse + 1 if best is not None and bits >= best[2] else 0
        if not worse:
            best = (escape, symbols, bits)
        elif worse == 2 and escape is not None:  # past the best escape: longer alphabets only cost more
            break
    return best[0], best[1]


def positions_from_gaps(symbols: np.ndarray, escape: int | None, kept: int, size: int) -> np.ndarray:
    """Flat positions of the kept weights; ValueError when the stream does not fit the layer."""
    symbols = symbols.astype(np.int64)
    if escape is None:
        positions = np.cumsum(symbols + 1) - 1
    else:
        is_escape = symbols == escape
        positions = (np.cumsum(np.where(is_escape, escape, symbols + 1)) - 1)[~is_escape]
    if len(positions) != kept or (kept and (positions[-1] >= size or symbols.max() > (escape or size))):
        raise ValueError(f"position stream does not fit a layer of {size} weights with {kept} kept")
    return positions
