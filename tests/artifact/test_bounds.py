"""Hostile files of the second round: malformed tied maps, things that are not files, bodies longer than their
header can explain, allocation failures, constructor arguments that build millions of modules, and frequency
tables of millions of entries. Each is refused with ArtifactError (one line, a non-empty reason) or read in
time linear in its bytes; the ones that took gigabytes or minutes run in a child capped at 1 GiB (test_hostile).
"""

import os
import random

import numpy as np
import pytest

import lwpipe
from lwpipe.artifact import ArtifactError, encode_model, read
from lwpipe.artifact.coding import BitReader, BitWriter
from lwpipe.artifact.format import pack, unpack
from lwpipe.artifact.inspect import main as inspect_main
from tests.artifact import forge
from tests.artifact.helpers import CONFIG, model_with
from tests.artifact.test_hostile import crafted, mask_layer, read_all


@pytest.fixture(scope="module")
def blob() -> bytes:
    return encode_model(model_with("pruned+shared+quant+half_bias", "pruned+quant_channel"), CONFIG)


def with_header(blob: bytes, **fields) -> bytes:
    header, body = unpack(blob)
    return pack(header | fields, body)


@pytest.mark.parametrize(
    "tied, word",
    [
        ([["9.weight", "1.weight"]], "tied is list, not an object"),
        ({"9.weight": ["1.weight"]}, "not the name of a stored tensor"),
        ({"9.weight": {"a": 1}}, "not the name of a stored tensor"),
        ({"9.weight": "nowhere.weight"}, "'nowhere.weight', which the file does not store"),
        ({"1.weight": "1.weight"}, "is itself stored"),
        ({"9.weight": "9.weight"}, "is itself stored"),
        ({"9.weight": "8.weight", "8.weight": "1.weight"}, "'8.weight', which the file does not store"),
    ],
)
def test_malformed_tied_maps_are_refused_by_load_and_inspect(tmp_path, capsys, blob, tied, word):
    data = with_header(blob, tied=tied)
    with pytest.raises(ArtifactError, match="cannot be decoded") as e:
        read(data)
    assert word in str(e.value)
    path = tmp_path / "model.lwp"
    path.write_bytes(data)
    with pytest.raises(ArtifactError, match="tied"):
        lwpipe.load(path)
    with pytest.raises(SystemExit) as exit_:
        inspect_main([str(path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and word in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_what_is_not_a_regular_file_is_refused_unread(tmp_path, blob):
    """A FIFO hung, /dev/zero and a 4 GiB sparse file ran out of memory; each is now refused before reading."""
    os.mkfifo(tmp_path / "pipe.lwp")
    (tmp_path / "dir.lwp").mkdir()
    sparse = tmp_path / "sparse.lwp"
    sparse.write_bytes(blob)
    os.truncate(sparse, 4 << 30)
    declared = tmp_path / "declared.lwp"
    declared.write_bytes(forge.declared_size(blob, 4 << 30))
    os.truncate(declared, 4 << 30)
    cases = {
        "fifo": (str(tmp_path / "pipe.lwp"), "is a FIFO (named pipe), not a regular file"),
        "dev_zero": ("/dev/zero", "is a character device, not a regular file"),
        "directory": (str(tmp_path / "dir.lwp"), "is a directory, not a regular file"),
        "sparse 4 GiB": (str(sparse), "unexpected bytes after its end"),
        "sparse 4 GiB, declared": (str(declared), "do not add up to the body's 4294967"),
    }
    got = read_all(tmp_path, {name: path for name, (path, _) in cases.items()})
    for name, (_, word) in cases.items():
        for reader in ("inspect", "load"):
            assert got[name][reader].startswith("REFUSED") and word in got[name][reader], (name, got[name])


@pytest.mark.slow
def test_a_body_longer_than_its_header_can_explain_is_refused_before_it_is_read(tmp_path, blob):
    """30 MB of padding behind a 10 KB model reached gigabytes in the bit reader; now the header refuses it."""
    header, body = unpack(blob)
    header["sections"][1] += 30 << 20
    cut = header["sections"][0]
    padded = pack(header, body[:cut] + b"\xff" * (30 << 20) + body[cut:])
    got = read_all(tmp_path, {"padded": padded})["padded"]
    for reader in ("inspect", "load"):
        assert "more than the" in got[reader] and "its declared content can take" in got[reader], got


def test_bytes_left_in_the_bit_section_are_refused(blob):
    header, body = unpack(blob)
    header["sections"][1] += 1024
    cut = header["sections"][0] + header["sections"][1] - 1024
    with pytest.raises(ArtifactError, match="data left over after the last tensor"):
        read(pack(header, body[:cut] + bytes(range(256)) * 4 + body[cut:]))


@pytest.mark.slow
def test_a_one_symbol_stream_of_a_trillion_levels_is_refused_by_inspect(tmp_path):
    """lwpipe-inspect tried to allocate 7.28 TiB here (np.full) and printed a traceback."""
    got = read_all(tmp_path, {"1e12": forge.memory({}, random.Random(3))})["1e12"]
    assert got["inspect"].startswith("REFUSED") and "reading it takes up to 4x that" in got["inspect"], got
    assert got["load"].startswith("REFUSED"), got


def test_running_out_of_memory_is_an_artifact_error(tmp_path, blob, monkeypatch):
    import lwpipe.artifact.decode as decode

    path = tmp_path / "model.lwp"
    path.write_bytes(blob)

    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(decode, "read_layer", no_memory)
    with pytest.raises(ArtifactError, match="cannot be decoded: not enough memory"):
        read(blob)
    monkeypatch.undo()
    monkeypatch.setattr(decode, "bake_in_place", no_memory)
    with pytest.raises(ArtifactError, match="not enough memory to build the model"):
        lwpipe.load(path)


def test_a_constructor_failing_without_a_message_is_refused_with_a_reason(tmp_path, blob, monkeypatch):
    import lwpipe.artifact.decode as decode

    def fails(**kwargs):
        raise MemoryError()

    path = tmp_path / "model.lwp"
    path.write_bytes(blob)
    monkeypatch.setattr(decode, "allowed_constructors", lambda: {"lwpipe.models.TinyMLP": fails})
    with pytest.raises(ArtifactError) as e:
        lwpipe.load(path)
    assert str(e.value).endswith("building the model lwpipe.models.TinyMLP failed: MemoryError")


@pytest.mark.slow
def test_constructor_arguments_are_bounded_before_anything_is_built(tmp_path, blob):
    """blocks: 100000 ran 70 s and 2.5 GB; GPT-2 n_layer 1e5 and num_labels 1e8 ran past 20 s or 2.5 GB."""
    gpt2 = {"model_type": "gpt2", "n_embd": 8, "n_head": 2, "n_layer": 2, "vocab_size": 64, "n_positions": 16}
    hf = "lwpipe.models.hf.from_config"
    cases = {
        "blocks": ({"_target_": "lwpipe.models.ResNet", "blocks": 100_000}, "model.blocks is 100,000"),
        "few blocks": ({"_target_": "lwpipe.models.ResNet", "blocks": 3}, "has at least 20 tensors, the file stores 4"),
        "widths": ({"_target_": "lwpipe.models.ResNet", "widths": [4] * 300_000}, "model.widths has 300,000 entries"),
        "n_layer": (
            {"_target_": hf, "config": gpt2 | {"n_layer": 10**5}, "auto_class": "AutoModelForCausalLM"},
            "model.config.n_layer is 100,000",
        ),
        "num_labels": (
            {
                "_target_": hf,
                "config": gpt2 | {"num_labels": 10**8},
                "auto_class": "AutoModelForSequenceClassification",
            },
            "model.config.num_labels is 100,000,000",
        ),
        "hidden": ({"_target_": "lwpipe.models.LeNet300", "hidden": [10**7, 10**7]}, "model.hidden.0 is 10,000,000"),
    }
    got = read_all(tmp_path, {name: with_header(blob, model=model) for name, (model, _) in cases.items()})
    for name, (_, word) in cases.items():
        assert got[name]["load"].startswith("REFUSED") and word in got[name]["load"], (name, got[name]["load"])
        assert "the model's arguments do not fit the file" in got[name]["load"]


def test_a_frequency_table_longer_than_its_stream_could_use_is_refused():
    """5,000 frequencies for a stream of 2 symbols: a uniform table costs less, so no writer stores one."""
    w = BitWriter()
    w.write_exp_golomb(1)  # the gap stream: one symbol
    w.write(0, 1)
    w.write(0, 9)
    w.write_exp_golomb(5000)  # the index stream: 5,000 frequencies for its 2 symbols
    w.write(0, 1)
    w.write(20, 5)
    w.write(0, 4)
    w.write(0, 6000)
    layer = mask_layer([100, 100], 2, 2, None) | {"shared": {"k": 5000, "codebook": ["float32"]}}
    with pytest.raises(ArtifactError, match="frequency table of 5,000 symbols for a stream of 2"):
        read(crafted([layer], bits=w.getvalue(), raw=bytes(20000), dense_bytes=40000))


@pytest.mark.parametrize("k", [0, 1, 4])
def test_exp_golomb_tables_read_in_bulk_across_chunks(k):
    rng = random.Random(k)
    values = [rng.choice([0, 0, 0, 1, 2, 7, 300, 2**20]) for _ in range(120_000)]  # > one 2^18-bit chunk
    w = BitWriter()
    w.write(5, 3)  # not byte-aligned
    for v in values:
        w.write_exp_golomb(v, k)
    w.write(1, 1)
    r = BitReader(w.getvalue())
    assert r.read(3) == 5
    assert r.read_exp_golomb_many(10, k, 2**20).tolist() == values[:10]
    assert r.read_exp_golomb_many(len(values) - 10, k, 2**20).tolist() == values[10:]
    assert r.read(1) == 1
    with pytest.raises(ValueError, match="frequency table is corrupt"):
        BitReader(bytes(64)).read_exp_golomb_many(3, k, 2**20)  # 512 zeros: no code that long
    with pytest.raises(ValueError, match="ends early"):
        BitReader(b"\xff").read_exp_golomb_many(8 // (k + 1) + 1, k, 2**20)  # one code more than the byte holds


@pytest.mark.slow
def test_a_table_of_two_million_entries_is_read(tmp_path):
    """2^21 frequencies (a 512 KB file): read once, in bulk (the reader took ~10 s a MB, one code at a time)."""
    rng = random.Random(0)
    while True:
        data = forge.table({}, rng)
        if len(data) > 500_000:
            break
    got = read_all(tmp_path, {"table": data})["table"]
    assert got["inspect"] == "LOADED", got
    assert np.isfinite(got["seconds"])


def test_inspect_takes_the_same_dense_size_limit_as_load(tmp_path, capsys, blob):
    path = tmp_path / "model.lwp"
    path.write_bytes(blob)
    with pytest.raises(SystemExit) as exit_:
        inspect_main([str(path), "--max-dense-bytes", "1000"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "dense size is 10,528 bytes, above the limit of 1,000" in err
    assert inspect_main([str(path), "--max-dense-bytes", "10528"]) == 0
