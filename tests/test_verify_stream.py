"""The run's self-check streams: the file's model is built on the meta device and each stored tensor is
decoded and compared alone, with the same verdict as loading the whole model."""

import pytest
import torch

import lwpipe
from lwpipe import verify
from lwpipe.artifact import encode_model
from lwpipe.artifact.decode import read_bytes
from lwpipe.artifact.format import unpack
from lwpipe.constraints import constraint
from lwpipe.errors import LwpipeError
from tests.helpers import TINY, run_recipe
from tests.hf_helpers import make_texts, save_llama, write_txt

QUICK = TINY + [
    "pipeline=[prune,quantize]",
    "stages.prune.finetune.epochs=0",
    "++stages.quantize.finetune.epochs=0",
    "++stages.quantize.bias=float16",
]


def test_streamed_check_builds_on_meta_and_agrees_with_the_whole_load(tmp_path):
    run_recipe(QUICK, tmp_path)
    path = tmp_path / "model.lwp"
    header, _ = unpack(read_bytes(path), str(path), view=True)
    assert verify.meta_model(header, str(path)) is not None  # the streamed path, not the whole-model fallback
    model = lwpipe.load(path, constrained=True)
    assert verify.streamed_mismatch(path, model) is None
    assert verify.artifact_mismatch(lwpipe.load(path), model) is None
    layer = next(m for m in model.modules() if constraint(m) is not None)
    with torch.no_grad():
        layer.parametrizations.weight.original.mul_(3.0)  # other levels: the check must see it
    assert verify.streamed_mismatch(path, model).endswith("differs")
    with pytest.raises(LwpipeError, match=r"decodes to other weights than the model it was written from"):
        verify.verify_artifact(path, model)


def test_a_file_with_a_tensor_the_model_lacks_is_refused(tmp_path):
    run_recipe(QUICK, tmp_path)
    model = lwpipe.load(tmp_path / "model.lwp", constrained=True)
    model.register_buffer("extra", torch.ones(3))
    bad = tmp_path / "bad.lwp"
    bad.write_bytes(encode_model(model, unpack(read_bytes(tmp_path / "model.lwp"), "f", view=True)[0]["model"]))
    with pytest.raises(LwpipeError, match=r"does not load.*tensors in the file the model lacks \['extra'\]"):
        verify.verify_artifact(bad, model)


@pytest.mark.slow
def test_a_bf16_llama_streams_in_its_own_dtype(tmp_path):
    rows = make_texts(48)
    directory = save_llama(tmp_path / "bf16", torch.bfloat16)
    train, test = write_txt(tmp_path / "train.txt", rows[:32]), write_txt(tmp_path / "test.txt", rows[32:])
    overrides = [
        "recipe=gptq_w4",
        f"model.path={directory}",
        f"data.train={train}",
        f"data.test={test}",
        "calibration.samples=8",
        "calibration.seq_len=16",
        "data.max_length=16",
        "logger.console=null",
    ]
    run_recipe(overrides, tmp_path / "run")
    path = tmp_path / "run" / "model.lwp"
    header, _ = unpack(read_bytes(path), str(path), view=True)
    assert verify.meta_model(header, str(path)) is not None
    model = lwpipe.load(path, constrained=True)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert verify.streamed_mismatch(path, model) is None


def test_the_check_reads_the_file_mapped_and_a_damaged_one_is_still_named(tmp_path):
    import mmap

    run_recipe(QUICK, tmp_path)
    path = tmp_path / "model.lwp"
    mapped = read_bytes(path, mapped=True)
    assert isinstance(mapped, mmap.mmap)
    (h1, b1), (h2, b2) = unpack(mapped, "m", view=True), unpack(read_bytes(path), "b", view=True)
    assert h1 == h2 and bytes(b1) == bytes(b2)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    bad = tmp_path / "bad.lwp"
    bad.write_bytes(bytes(data))
    with pytest.raises(LwpipeError, match="damaged: its CRC-32"):
        verify.verify_artifact(bad, lwpipe.load(path, constrained=True))
