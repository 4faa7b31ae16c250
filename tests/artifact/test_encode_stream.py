"""Encoding layer by layer: symbols computed again when coded give the very bytes of the queued encoding, the
file is assembled as format.pack lays it out, and encoded_size is its length without holding it."""

import torch
from torch import nn

from lwpipe.artifact import encode as encode_module
from lwpipe.artifact.coding import StreamWriter
from lwpipe.artifact.encode import encode, encode_parts, encoded_size, write_encoded
from lwpipe.artifact.format import pack
from lwpipe.constraints import ensure_constraint
from lwpipe.grid import quantize_layer


def small_model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 50)).to(dtype)
    quantize_layer(m[1], 4, "symmetric", per_channel=True, group=8)
    c = ensure_constraint(m[3])
    c.set_mask(torch.rand(50, 32) > 0.5)
    quantize_layer(m[3], 3, "asymmetric", per_channel=True)
    return m


def eager(monkeypatch) -> None:
    """A StreamWriter that ignores `again`: every stream queued, as before."""
    real = StreamWriter.symbols
    monkeypatch.setattr(StreamWriter, "symbols", lambda self, s, label="", again=None: real(self, s, label))


def test_lazy_symbols_give_the_bytes_of_queued_ones(monkeypatch):
    for dtype in (torch.float32, torch.bfloat16):
        lazy, stats = encode(small_model(dtype), None)
        with monkeypatch.context() as mp:
            eager(mp)
            queued, queued_stats = encode(small_model(dtype), None)
        assert bytes(lazy) == bytes(queued) and stats == queued_stats


def test_assembled_file_is_format_pack_and_encoded_size_is_its_length():
    model = small_model(torch.bfloat16)
    header, (raw, bits, words), version, _ = encode_parts(model, None, bytearray())
    packed = pack(header, bytes(raw) + bits + words.tobytes(), version)
    assert bytes(encode_module.assemble(header, (raw, bits, words), version)) == packed
    assert encoded_size(model, None) == len(packed) == len(encode(model, None)[0])


def test_written_file_is_the_encoded_bytes(tmp_path):
    for dtype in (torch.float32, torch.bfloat16):
        model = small_model(dtype)
        size = write_encoded(model, None, tmp_path / "m.lwp")
        assert (tmp_path / "m.lwp").read_bytes() == bytes(encode(model, None)[0])
        assert size == (tmp_path / "m.lwp").stat().st_size
        assert not [p for p in tmp_path.iterdir() if p.name != "m.lwp"]  # no temporary file left
