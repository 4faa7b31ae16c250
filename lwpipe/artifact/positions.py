"""Positions of the kept weights as relative gaps, with Deep Compression's escape for long runs.

A kept weight after g pruned ones is the symbol g. With an escape value E, a
gap g >= E is written as g // E escape symbols (each: "E pruned weights, no
kept one") followed by g % E, so the alphabet stays 0..E however sparse the
layer. E is chosen per layer for the fewest coded bits.
"""

from __future__ import annotations

import numpy as np

from lwpipe.artifact.coding import choose_table

MAX_ESCAPE = 1 << 16


def gap_symbols(positions: np.ndarray, escape: int | None) -> np.ndarray:
    return symbols_of_gaps(plain_gaps(positions), escape)


def plain_gaps(positions: np.ndarray) -> np.ndarray:
    gaps = np.diff(positions.astype(np.int64, copy=False), prepend=-1)
    gaps -= 1
    return gaps


def symbols_of_gaps(gaps: np.ndarray, escape: int | None) -> np.ndarray:
    """The stream for `escape` (None: the gaps themselves), at the narrowest dtype that holds its symbols."""
    largest = int(gaps.max()) if len(gaps) else 0
    top = largest if escape is None else min(escape, largest)
    narrow = np.uint8 if top < 1 << 8 else np.uint16 if top < 1 << 16 else np.int64
    if escape is None or largest < escape:  # no run needs an escape: the gaps as they are
        return gaps.astype(narrow)
    runs, rest = np.divmod(gaps, escape)
    runs += 1
    ends = np.cumsum(runs, out=runs)
    out = np.full(int(ends[-1]), escape, dtype=narrow)
    ends -= 1
    out[ends] = rest
    return out


def choose_escape(positions: np.ndarray) -> tuple[int | None, np.ndarray]:
    """(escape, symbols) with the smallest estimated coded size.

    Each candidate escape is costed from the histogram of the gaps alone (the symbol counts it
    would give follow from it), so only the chosen escape's symbols are ever built."""
    gaps = plain_gaps(positions)
    hist = np.bincount(gaps) if len(gaps) else np.zeros(0, dtype=np.int64)
    largest = len(hist) - 1 if len(hist) else 0
    best, worse = None, 0
    for escape in [(1 << j) - 1 for j in range(1, 17) if (1 << j) - 1 <= largest] + [None] * (largest < MAX_ESCAPE):
        bits = choose_table(escape_counts(hist, escape))[3] if len(hist) else 0.0
        worse = worse + 1 if best is not None and bits >= best[1] else 0
        if not worse:
            best = (escape, bits)
        elif worse == 2 and escape is not None:  # past the best escape: longer alphabets only cost more
            break
    return best[0], symbols_of_gaps(gaps, best[0])


def escape_counts(hist: np.ndarray, escape: int | None) -> np.ndarray:
    """np.bincount(gap_symbols(positions, escape)) from hist = np.bincount(the plain gaps)."""
    if escape is None:
        return hist
    g = np.arange(len(hist))
    counts = np.bincount(g % escape, weights=hist, minlength=escape + 1)
    counts[escape] = float((g // escape * hist).sum())
    counts = np.rint(counts).astype(np.int64)
    return counts[: np.flatnonzero(counts)[-1] + 1]


def positions_from_gaps(symbols: np.ndarray, escape: int | None, kept: int, size: int) -> np.ndarray:
    """Flat positions of the kept weights; ValueError when the stream does not fit the layer."""
    limit = escape or size
    if escape == 1:  # every symbol is one weight (1: pruned, 0: kept): the stream is the mask itself
        positions = np.flatnonzero(symbols != 1)
        if len(positions) != kept or (kept and (positions[-1] >= size or symbols.max() > 1)):
            raise ValueError(f"position stream does not fit a layer of {size} weights with {kept} kept")
        return positions
    # in place from here: one array the size of the stream, int32 when the layer allows (half the traffic)
    steps = symbols.astype(np.int32 if size + (escape or 0) < 1 << 31 else np.int64)
    steps += 1
    if escape is not None:
        is_escape = symbols == escape
        if is_escape.any():
            steps[is_escape] = escape
        else:  # no run was long enough to need an escape (the common case for moderate sparsity)
            escape = None
    positions = np.cumsum(steps, out=steps)
    positions -= 1
    if escape is not None:
        positions = positions[~is_escape]
    if len(positions) != kept or (kept and (positions[-1] >= size or symbols.max() > limit)):
        raise ValueError(f"position stream does not fit a layer of {size} weights with {kept} kept")
    return positions
