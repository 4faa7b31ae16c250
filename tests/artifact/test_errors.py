"""Bad files: each gets one clear error from lwpipe.load and a non-zero exit from lwpipe-inspect."""

import zlib

import pytest
import torch
from torch import nn

import lwpipe
from lwpipe.artifact import ArtifactError, encode_model
from lwpipe.artifact.format import VERSION
from lwpipe.artifact.inspect import main as inspect_main
from tests.artifact.helpers import CONFIG, SmallConv, model_with


@pytest.fixture(scope="module")
def blob() -> bytes:
    return encode_model(model_with("pruned+shared+quant+half_bias", "pruned+quant_channel"), CONFIG)


def write(tmp_path, data: bytes):
    path = tmp_path / "model.lwp"
    path.write_bytes(data)
    return path


def with_crc(data: bytes) -> bytes:
    """The file as a writer would have made it: the checksum matches whatever the bytes say."""
    return data[:-4] + zlib.crc32(data[:-4]).to_bytes(4, "little")


def assert_refused(tmp_path, data: bytes, *words: str, capsys=None, **load_kwargs):
    path = write(tmp_path, data)
    with pytest.raises(ArtifactError) as e:
        lwpipe.load(path, **load_kwargs)
    for w in words:
        assert w in str(e.value)
    assert str(path) in str(e.value)
    if capsys is not None:
        with pytest.raises(SystemExit) as exit_:
            inspect_main([str(path)])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("lwpipe-inspect: error:") and all(w in err for w in words)
        assert "Traceback" not in err


def test_good_file_inspects(tmp_path, blob, capsys):
    assert inspect_main([str(write(tmp_path, blob))]) == 0
    out = capsys.readouterr().out
    assert "1.weight" in out and "3.weight" in out and "% kept" in out and "index bits" in out
    assert f"{len(blob):,}" in out.splitlines()[-1]  # the total row is the file's size


@pytest.mark.parametrize("cut", [3, 6, 40, -1])
def test_truncated_file(tmp_path, blob, capsys, cut):
    assert_refused(tmp_path, blob[:cut], "truncated", capsys=capsys)


@pytest.mark.parametrize("where", [12, 0.5, -1])
def test_flipped_byte_fails_the_checksum(tmp_path, blob, capsys, where):
    data = bytearray(blob)
    i = int(where * len(blob)) if isinstance(where, float) else where
    data[i] ^= 0x10
    assert_refused(tmp_path, bytes(data), "checksum", capsys=capsys)


def test_trailing_bytes(tmp_path, blob):
    assert_refused(tmp_path, blob + b"\0", "unexpected bytes")


def test_wrong_version(tmp_path, blob, capsys):
    data = bytearray(blob)
    data[4] = VERSION + 1
    assert_refused(
        tmp_path,
        with_crc(bytes(data)),
        f"format version {VERSION + 1}",
        f"reads versions 1..{VERSION}",
        "newer",
        capsys=capsys,
    )
    data[4] = 0
    assert_refused(tmp_path, with_crc(bytes(data)), "format version 0", "an older lwpipe", capsys=capsys)


@pytest.mark.parametrize("data", [b"", b"PK\x03\x04 a zip, say", b'{"not": "an artifact"}'])
def test_not_an_artifact(tmp_path, capsys, data):
    assert_refused(tmp_path, data, "not an lwpipe artifact", capsys=capsys)


def test_a_checkpoint_is_not_an_artifact(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(tmp_path / "x.safetensors"))
    assert_refused(tmp_path, (tmp_path / "x.safetensors").read_bytes(), "not an lwpipe artifact")


@pytest.mark.parametrize(
    "config",
    [
        {"_target_": "builtins.exec", "source": "open('PWNED', 'w')"},
        {"_target_": "torch.nn.Linear", "in_features": 4, "out_features": 2},
        {"_target_": "lwpipe.models.TinyMLP", "hidden": {"_target_": "builtins.eval", "source": "1"}},
    ],
)
def test_constructor_off_the_allowlist_is_refused(tmp_path, capsys, monkeypatch, config):
    monkeypatch.chdir(tmp_path)
    data = encode_model(nn.Linear(4, 2), config)
    assert_refused(tmp_path, data, "not on the allowlist", "lwpipe.models.TinyMLP", "trusted=True", capsys=capsys)
    assert not (tmp_path / "PWNED").exists()


def test_trusted_or_own_module_lifts_the_allowlist(tmp_path):
    torch.manual_seed(0)
    linear = nn.Linear(4, 2).eval()
    path = write(tmp_path, encode_model(linear, {"_target_": "torch.nn.Linear", "in_features": 4, "out_features": 2}))
    x = torch.randn(3, 4)
    assert torch.equal(lwpipe.load(path, trusted=True)(x), linear(x))
    assert torch.equal(lwpipe.load(path, module=nn.Linear(4, 2))(x), linear(x))
    assert inspect_main([str(path), "--trusted"]) == 0


def test_module_that_does_not_fit(tmp_path, blob):
    assert_refused(tmp_path, blob, "does not fit the model SmallConv", "1.weight", module=SmallConv())


def test_missing_file(tmp_path):
    with pytest.raises(ArtifactError, match="cannot read"):
        lwpipe.load(tmp_path / "nope.lwp")
