"""Stage `export`: dense / int8 / sparse forms, loadable by torch alone in a fresh process, same predictions."""
import json
import subprocess
import sys

import pytest
import torch

from lwpipe import export
from lwpipe.config import validate
from lwpipe.errors import ConfigError
from lwpipe.models import ResNet
from tests.helpers import TINY, compose_recipe, run_recipe

CHAIN = [*TINY, "stages.train.epochs=8", "stages.train.lr=0.01", "++stages.prune.finetune.epochs=1",
         "++stages.quantize.finetune.epochs=1"]

FRESH = """
import sys, torch
sys.modules["lwpipe"] = None  # the exported file must not need lwpipe
path, x_path, y_path = sys.argv[1:]
m = torch.export.load(path).module() if path.endswith(".pt2") else torch.jit.load(path)
torch.save(m(torch.load(x_path)), y_path)
"""


@pytest.mark.parametrize("fmt", ["dense", "sparse", "int8"])
def test_export_forms_load_without_lwpipe_and_keep_predictions(fmt, tmp_path):
    final, records = run_recipe([*CHAIN, "pipeline=[train,prune,quantize,export]", f"+stages.export.format={fmt}",
                                 "+stages.export.min_sparsity=0.3"], tmp_path)
    ends = [r for r in records if r["event"] == "stage_end"]
    assert final["macs"] == ends[-2]["macs"] > 0  # a scripted form has no hookable layers: counted on the model
    info = json.loads((tmp_path / "export.json").read_text())
    assert info["agreement"] >= 0.995 and info["format"] == fmt
    if fmt == "sparse":
        assert info["sparse_layers"]
    path = tmp_path / info["file"]
    x = torch.randn(7, 8)
    torch.save(x, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", FRESH, str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   check=True, cwd=tmp_path)
    with torch.no_grad():
        assert torch.allclose(torch.load(tmp_path / "y.pt"), export.load_form(path)(x))


def test_int8_static_on_a_resnet_uses_the_quantize_levels(tmp_path):
    from lwpipe.stages.quantize import quantize_layer
    from lwpipe.constraints import compressible_layers

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
        validate(compose_recipe([*TINY, "pipeline=[train,quantize,export]", "+stages.export.format=int8",
                                 "++stages.quantize.bits=12"]))


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
    assert [l.reduce_range for l in (wide[0], wide[2])] == [True, True]
    assert [l.reduce_range for l in (narrow[0], narrow[2])] == [False, False]
    with torch.no_grad():
        ref = small(x)
        err_full = (narrow(x) - ref).abs().mean()
        for layer in (narrow[0], narrow[2]):
            layer.reduce_range = True
        err_7bit = (narrow(x) - ref).abs().mean()
    assert err_full < err_7bit  # the 8th bit of the activations is real precision
