"""Tensors stored exactly: at the narrowest float dtype that holds them, little-endian.

A float tensor may also be split into fields: sign and exponent as one
entropy-coded symbol (biases and scales span few exponents: ~3-4 bits instead
of 6-12) and the mantissa bits packed as they are (they are close to uniform).
"""

from __future__ import annotations

import numpy as np
import torch

DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}
_BITS_AS_INT = {torch.float64: torch.int64, torch.float32: torch.int32}
# dtype: (exponent bits, mantissa bits, integer dtype of the same width)
FLOAT_FIELDS = {
    torch.float16: (5, 10, torch.int16),
    torch.bfloat16: (8, 7, torch.int16),
    torch.float32: (8, 23, torch.int32),
    torch.float64: (11, 52, torch.int64),
}
_UNSIGNED = {torch.int16: np.uint16, torch.int32: np.uint32, torch.int64: np.uint64}


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"tensors of dtype {name} cannot be stored (supported: {', '.join(DTYPES)})")
    return name


def lossless_dtype(t: torch.Tensor) -> torch.dtype:
    """float16 or bfloat16 when every value (sign of zero, infinities included) survives the trip, else t.dtype.

    A bias held to fp16 by its parametrization (constraints.HalfBias) takes 2 bytes this way."""
    as_int = _BITS_AS_INT.get(t.dtype)
    if as_int is None:
        return t.dtype
    for narrow in (torch.float16, torch.bfloat16):
        if torch.equal(t.to(narrow).to(t.dtype).view(as_int), t.view(as_int)):
            return narrow
    return t.dtype


def tensor_bytes(t: torch.Tensor, dtype: torch.dtype | None = None) -> bytes:
    t = t.detach().cpu().to(dtype or t.dtype).contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


CHUNK = 1 << 16  # floats split or joined at a time


def split_float(t: torch.Tensor) -> tuple[np.ndarray, int, bytes]:
    """(sign/exponent symbols, smallest exponent, packed mantissa bits) of a float tensor, exactly."""
    e_bits, m_bits, as_int = FLOAT_FIELDS[t.dtype]
    u = t.detach().cpu().contiguous().reshape(-1).view(as_int).numpy().view(_UNSIGNED[as_int])  # no copy
    symbols, low = sign_exponent(u, e_bits, m_bits)
    shifts = np.arange(m_bits - 1, -1, -1, dtype=np.uint64)
    # in chunks of CHUNK values (a multiple of 8: each chunk's bits end on a byte): the bit matrix of a
    # whole tensor would take 8 * m_bits bytes a value (184 for fp32)
    mantissa = b"".join(
        np.packbits(
            ((u[i : i + CHUNK, None].astype(np.uint64) >> shifts) & np.uint64(1)).astype(np.uint8).reshape(-1)
        ).tobytes()
        for i in range(0, len(u), CHUNK)
    )
    return symbols, low, mantissa


def sign_exponent(u: np.ndarray, e_bits: int, m_bits: int, low: int | None = None) -> tuple[np.ndarray, int]:
    """(2 x (exponent - low) + sign as uint16, low) of a float's bits `u` (low: the smallest exponent unless
    given). Computed in place at 2 bytes a value: a 65 M-value bf16 table's fields take 130 MB, not 1 GB."""
    symbols = ((u >> m_bits) & ((1 << e_bits) - 1)).astype(np.uint16)
    if low is None:
        low = int(symbols.min()) if len(symbols) else 0
    symbols -= np.uint16(low)
    symbols <<= 1
    symbols |= (u >> (e_bits + m_bits)).astype(np.uint16)
    return symbols, low


def join_float(symbols: np.ndarray, low: int, mantissa: bytes, dtype: torch.dtype) -> torch.Tensor:
    e_bits, m_bits, as_int = FLOAT_FIELDS[dtype]
    n = len(symbols)
    packed, shifts = np.frombuffer(mantissa, dtype=np.uint8), np.arange(m_bits - 1, -1, -1, dtype=np.uint64)
    unsigned = _UNSIGNED[as_int]  # the float's own width: a 65 M-value bf16 table is 130 MB here, not 520
    if n and int(symbols.max()) // 2 + low >= 1 << e_bits:
        raise ValueError("float exponent out of range")
    u = np.empty(n, dtype=unsigned)
    for i in range(0, n, CHUNK):  # CHUNK values are CHUNK * m_bits / 8 whole bytes
        m = min(CHUNK, n - i)
        part = packed[i * m_bits // 8 : (i * m_bits + m * m_bits + 7) // 8]
        bits = np.unpackbits(part)[: m * m_bits].reshape(m, m_bits)
        if len(bits) < m:
            raise ValueError("float mantissa shorter than its count")
        u[i : i + m] = (bits.astype(np.uint64) << shifts).sum(1, dtype=np.uint64)
    field = (symbols >> 1).astype(unsigned)  # one value-sized scratch array, shifted and or-ed in place
    field += unsigned(low)
    field <<= unsigned(m_bits)
    u |= field
    np.bitwise_and(symbols, 1, out=field, casting="unsafe")
    field <<= unsigned(e_bits + m_bits)
    u |= field
    del field
    return torch.from_numpy(u.view(np.dtype(str(as_int).removeprefix("torch.")))).view(dtype)


def mantissa_bytes(n: int, dtype: torch.dtype) -> int:
    return (n * FLOAT_FIELDS[dtype][1] + 7) // 8


class RawReader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, size: int) -> bytes:
        if size < 0 or self.pos + size > len(self.data):
            raise ValueError("raw section ends early")
        self.pos += size
        return self.data[self.pos - size : self.pos]

    def tensor(self, dtype_name_: str, shape, restore: torch.dtype | None = None) -> torch.Tensor:
        if dtype_name_ not in DTYPES:
            raise ValueError(f"unknown stored dtype {dtype_name_!r}")
        dtype = DTYPES[dtype_name_]
        n = 1
        for s in shape:
            if int(s) < 0:
                raise ValueError(f"negative dimension in shape {shape}")
            n *= int(s)
        size = n * torch.empty((), dtype=dtype).element_size()
        chunk = bytearray(self.take(size))
        t = torch.frombuffer(chunk, dtype=torch.uint8).view(dtype) if size else torch.empty(0, dtype=dtype)
        return t.reshape(tuple(shape)).to(restore or dtype)
