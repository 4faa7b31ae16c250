"""Stage `export`: dense / int8 / sparse forms, loadable by torch alone in a fresh process, same predictions."""

import json
import subprocess
import sys

import pytest
import torch

from lwpipe import checkpoint, export
from lwpipe.config import validate
from lwpipe.errors import ConfigError
from lwpipe.models import ResNet
from tests.helpers import TINY, compose_recipe, run_recipe

CHAIN = [
    *TINY,
    "stages.train.epochs=8",
    "stages.train.lr=0.01",
    "++stages.prune.finetune.epochs=1",
    "++stages.quantize.finetune.epochs=1",
]

FRESH = """
import sys, torch
sys.modules["lwpipe"] = None  # the exported file must not need lwpipe
path, x_path, y_path = sys.argv[1:]
m = torch.export.load(path).module() if path.endswith(".pt2") else torch.jit.load(path)
torch.save(m(torch.load(x_path)), y_path)
"""


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["dense", "sparse", "int8"])
def test_export_forms_load_without_lwpipe_and_keep_predictions(fmt, tmp_path):
    final, records = run_recipe(
        [
            *CHAIN,
            "pipeline=[train,prune,quantize,export]",
            f"+stages.export.format={fmt}",
            *(["+stages.export.min_sparsity=0.3"] if fmt == "sparse" else []),  # read by sparse only
        ],
        tmp_path,
    )
    ends = [r for r in records if r["event"] == "stage_end"]
    assert final["macs"] == ends[-2]["macs"] > 0  # a scripted form has no hookable layers: counted on the model
    info = json.loads((tmp_path / "export.json").read_text())
    assert info["agreement_with_model"] >= 0.995 and info["format"] == fmt  # the file follows its model
    if fmt == "sparse":
        assert info["sparse_layers"]
    path = tmp_path / info["file"]
    x = torch.randn(7, 8)
    torch.save(x, tmp_path / "x.pt")
    subprocess.run(
        [sys.executable, "-c", FRESH, str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        check=True,
        cwd=tmp_path,
    )
    with torch.no_grad():
        assert torch.allclose(torch.load(tmp_path / "y.pt"), export.load_form(path)(x))


def test_int8_static_on_a_resnet_uses_the_quantize_levels(tmp_path):
    from lwpipe.constraints import compressible_layers
    from lwpipe.stages.quantize import quantize_layer

    torch.manual_seed(0)
    m = ResNet(widths=(4, 8)).eval()
    for _, layer in compressible_layers(m):
        quantize_layer(layer, 8, per_channel=True)
    x = torch.randn(16, 3, 16, 16)
    q = export.int8_form(m, x, "static")
    levels = export.weight_levels(m)
    qconv = dict(q.named_modules())["layers.1.conv1"]
    assert torch.equal(qconv.weight().int_repr().abs(), levels["layers.1.conv1"][0].abs())  # no second rounding
    with torch.no_grad():
        ref, out = m(x), q(x)
    assert torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0) > 0.98


def test_dense_form_folds_batchnorm():
    torch.manual_seed(0)
    m = ResNet(widths=(4, 8)).eval()
    for bn in m.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_var.uniform_(0.5, 2), bn.running_mean.uniform_(-1, 1)
    d = export.dense_form(m)
    assert not any(isinstance(b, torch.nn.BatchNorm2d) for b in d.modules())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(d(x), m(x), rtol=1e-4, atol=1e-5)


def test_export_must_be_last_and_int8_needs_quantize():
    with pytest.raises(ConfigError, match=r"pipeline\[1\]=.*must be the last stage"):
        validate(compose_recipe([*TINY, "pipeline=[train,export,prune]"]))
    with pytest.raises(ConfigError, match="add a quantize stage before export"):
        validate(compose_recipe([*TINY, "pipeline=[train,prune,export]", "+stages.export.format=int8"]))
    with pytest.raises(ConfigError, match="scheme=symmetric and bits<=8"):
        validate(
            compose_recipe(
                [*TINY, "pipeline=[train,quantize,export]", "+stages.export.format=int8", "++stages.quantize.bits=12"]
            )
        )


def test_int8_dynamic_keeps_8_bit_activations_only_where_levels_cannot_saturate():
    from lwpipe.constraints import compressible_layers
    from lwpipe.stages.quantize import quantize_layer

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
    for _, layer in compressible_layers(m):
        quantize_layer(layer, 8, per_channel=True)  # levels reach +-127: 7-bit activations stay
    small = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
    for _, layer in compressible_layers(small):
        quantize_layer(layer, 7, per_channel=True)  # levels within +-63: full 8-bit activations
    x = torch.randn(32, 64)
    wide, narrow = export.int8_form(m, x, "dynamic"), export.int8_form(small, x, "dynamic")
    assert [q.reduce_range for q in (wide[0], wide[2])] == [True, True]
    assert [q.reduce_range for q in (narrow[0], narrow[2])] == [False, False]
    with torch.no_grad():
        ref = small(x)
        err_full = (narrow(x) - ref).abs().mean()
        for layer in (narrow[0], narrow[2]):
            layer.reduce_range = True
        err_7bit = (narrow(x) - ref).abs().mean()
    assert err_full < err_7bit  # the 8th bit of the activations is real precision


def test_a_dense_export_holds_the_model_not_the_test_set(tmp_path):
    """The example batch is a slice of the test set: torch.export would save the storage behind it."""
    import zipfile

    final, _ = run_recipe([*TINY, "pipeline=[export]", "data.n=20000", "data.test_fraction=0.9"], tmp_path)
    test_bytes = 18000 * 8 * 4
    info = json.loads((tmp_path / "export.json").read_text())
    assert info["bytes"] < final["dense_bytes"] + 32_000 < test_bytes  # the model and torch.export's own files
    with zipfile.ZipFile(tmp_path / info["file"]) as z:
        samples = sum(i.file_size for i in z.infolist() if "sample_inputs" in i.filename)
    assert samples < 4_000  # two examples of 8 floats, and the pickle around them


@pytest.mark.slow
def test_export_scores_the_file_against_the_uncompressed_model(tmp_path):
    """export.json and the export stage's record: the loaded file's accuracy, its agreement with the model
    before any compression, and (agreement_with_model) with the compressed model it was made from."""
    import lwpipe
    from lwpipe.models import TinyMLP
    from lwpipe.runner import build_data

    overrides = [
        *CHAIN,
        "pipeline=[train,prune,quantize,export]",
        "+stages.export.format=sparse",
        "+stages.export.min_sparsity=0.3",
        "stages.prune.sparsity=0.85",
        "++stages.prune.finetune.epochs=0",
        "++stages.quantize.finetune.epochs=0",
        "++stages.quantize.bits=3",
    ]
    final, records = run_recipe(overrides, tmp_path)
    info = json.loads((tmp_path / "export.json").read_text())
    x, y = build_data(validate(compose_recipe(overrides)).top.data).test.tensors[:2]
    uncompressed = checkpoint.load_state(TinyMLP(), tmp_path / "checkpoints" / "01_train.safetensors").eval()
    with torch.no_grad():
        before = uncompressed(x).argmax(1)
        model = lwpipe.load(tmp_path / "model.lwp")(x).argmax(1)
        file = export.load_form(tmp_path / info["file"])(x).argmax(1)
    assert (model != before).any()  # compression changed predictions: the two references differ here
    assert info["reference"] == "uncompressed" and all(r["reference"] == "uncompressed" for r in records)
    assert info["agreement"] == pytest.approx((file == before).float().mean().item())
    assert info["agreement_with_model"] == pytest.approx((file == model).float().mean().item())
    assert info["accuracy"] == pytest.approx((file == y).float().mean().item())
    assert (final["accuracy"], final["teacher_agreement"]) == (info["accuracy"], info["agreement"])


@pytest.mark.slow
def test_a_sentence_encoders_int8_file_is_scored_against_the_original(tmp_path):
    """Cosine of the int8 file's embeddings to the uncompressed encoder's, in export.json and in the
    export stage's record (not the quantized model's cosine repeated, nor the file against that model)."""
    from torch.nn.functional import cosine_similarity

    from lwpipe.runner import build_data, build_model
    from lwpipe.tasks import inputs
    from tests.hf_helpers import make_texts, save_sentence_model, write_txt

    rows = make_texts(48)
    files = [
        save_sentence_model(tmp_path / "st"),
        write_txt(tmp_path / "a.txt", rows[:32]),
        write_txt(tmp_path / "b.txt", rows[32:]),
    ]
    overrides = [
        "recipe=sentence_embedding",
        f"model.path={files[0]}",
        f"data.train={files[1]}",
        f"data.test={files[2]}",
        "data.batch_size=8",
        "data.max_length=16",
        "eval.batch_size=16",
        "pipeline=[quantize,export]",
        "++stages.quantize.bits=6",
        "++stages.quantize.step=0.3",  # at 0.35 the int8 file happens to score exactly as the quantized model
        "++stages.quantize.scheme=symmetric",
        "+stages.export.format=int8",
    ]
    final, records = run_recipe(overrides, tmp_path / "run")
    info = json.loads((tmp_path / "run" / "export.json").read_text())
    top = validate(compose_recipe(overrides)).top
    data, original = build_data(top.data), build_model(top.model).eval()
    file = export.load_form(tmp_path / "run" / info["file"])
    with torch.no_grad():
        batches = data.test.batches(16)
        want = torch.cat([original(**inputs(b)) for b in batches])
        got = torch.cat([file(**inputs(b)) for b in batches])
    cosine = cosine_similarity(got, want, dim=-1).mean().item()
    quantized = [r for r in records if r.get("type") == "quantize"][-1]["quality"]
    assert info["reference"] == "uncompressed" and info["quality"] == pytest.approx(cosine, abs=1e-5)
    assert final["quality"] == final["cosine"] == info["quality"] != quantized
    assert info["agreement_with_model"] > info["quality"]  # closer to the model it was made from


def test_the_summary_times_the_baked_model_and_the_exported_file(tmp_path, caplog):
    """Each speed figure names its form: the export's record times the file, the stage before it a baked copy."""
    import logging

    caplog.set_level(logging.INFO, "lwpipe")
    final, records = run_recipe(
        [*CHAIN, "pipeline=[train,prune,export]", "measure.batch=16", "measure.repeats=3", "measure.warmup=1"], tmp_path
    )
    ends = [r for r in records if r["event"] != "epoch"]
    assert [r["latency_form"] for r in ends] == ["plain", "plain", "baked", "export.pt2 dense"]
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "speedup vs input (baked plain model):" in text and "speedup vs input (export.pt2 dense):" in text
    assert "agree: vs the uncompressed model" in text
    assert all(len(line) <= 80 for line in text.splitlines() if "speedup" in line or "uncompressed" in line)


def test_a_text_models_export_holds_two_rows_of_token_ids_not_the_test_set(tmp_path):
    import zipfile

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(50, 4)

        def forward(self, input_ids, attention_mask=None):
            return self.embed(input_ids).mean(1)

    ids = torch.randint(0, 50, (20000, 16))  # a tokenized test set; the example is a slice of it
    example = {"input_ids": ids[:2], "attention_mask": torch.ones_like(ids)[:2]}
    export.save_form(Encoder().eval(), example, tmp_path / "e.pt2")
    with zipfile.ZipFile(tmp_path / "e.pt2") as z:
        samples = sum(i.file_size for i in z.infolist() if "sample_inputs" in i.filename)
    assert samples < 4_000 < ids.numel() * 8
