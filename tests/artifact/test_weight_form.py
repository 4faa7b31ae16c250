"""The compressed-weight schema (lwpipe/schema.py): its rules, and forms with an inconsistency refused.

A form is built from a layer's constraint when writing (the writer refuses one the reader would refuse) and
parsed from the header when reading (a forged file declaring such a form is refused, naming the layer).
"""

import pytest
import torch
from torch import nn

from lwpipe.artifact import ArtifactError, encode_model, read
from lwpipe.constraints import constraint, ensure_constraint
from lwpipe.deploy.levels import layer_grid
from lwpipe.errors import LwpipeError
from lwpipe.grid import quant_range, quantize_layer
from lwpipe.schema import SCHEMA_VERSION, FormError, Grid, WeightForm, layer_kind, output_axis
from tests.artifact.test_grid_schema import LAYERS, grid_file, hf_conv1d

KINDS = {"linear": "Linear", "conv1d": "Conv1d", "conv2d": "Conv2d", "embedding": "Embedding", "hf_conv1d": "Conv1D"}


@pytest.mark.parametrize("name", list(KINDS))
def test_each_layer_type_has_one_kind_and_output_axis(name):
    m = LAYERS[name]()[0]
    assert layer_kind(m) == KINDS[name]
    ensure_constraint(m)  # a parametrized module's class is a generated subclass: the same kind
    assert layer_kind(m) == KINDS[name]
    assert output_axis(KINDS[name]) == (1 if name == "hf_conv1d" else 0)


@pytest.mark.parametrize("scheme", ["symmetric", "symmetric_full", "asymmetric"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_a_grids_scheme_and_full_range_follow_from_its_level_bounds(bits, scheme):
    grid = Grid(bits, *quant_range(bits, scheme))
    assert grid.scheme == scheme
    assert grid.full_range == (scheme != "symmetric")
    grid.check((4, 4), "g")  # the quantize stage's ranges are within their bits
    assert Grid(1, -1, 1).scheme == "binary" and Grid(3, -2, 2).scheme == "custom"


def test_scale_shapes_and_the_last_groups_width():
    assert Grid(4, -7, 7).scale_shape((6, 10)) == ()
    assert Grid(4, -7, 7, axis=0).scale_shape((6, 10)) == (6, 1)
    assert Grid(4, -7, 7, axis=1).scale_shape((10, 6)) == (1, 6)  # transformers' Conv1D: [in, out]
    assert Grid(4, -7, 7, axis=0).scale_shape((4, 3, 3, 3)) == (4, 1, 1, 1)
    grouped = Grid(4, -7, 7, axis=0, group=4)
    assert grouped.scale_shape((6, 10)) == (6, 3) and grouped.last_group((6, 10)) == 2
    assert Grid(4, -7, 7, axis=1, group=5).scale_shape((10, 6)) == (2, 6)
    assert Grid(4, -7, 7, axis=1, group=5).last_group((10, 6)) == 5
    assert Grid(4, -7, 7, axis=0).last_group((6, 10)) is None


def test_a_layers_form_is_what_its_constraint_holds():
    torch.manual_seed(0)
    model = hf_conv1d()
    quantize_layer(model[0], 4, "asymmetric", per_channel=True)
    form = WeightForm.of("0.weight", model[0], constraint(model[0]))
    assert form.version == SCHEMA_VERSION and form.kind == "Conv1D" and form.shape == (8, 6)
    assert form.grid == Grid(4, 0, 15, axis=1) and form.codebook == 0
    assert form.mask  # quantize pins the weights that round to 0 into the mask
    (layer,) = read(encode_model(model, None)).layers
    assert layer.form == WeightForm("0.weight", None, (8, 6), "float32", mask=True, grid=Grid(4, 0, 15, axis=1))


# -- inconsistent forms: refused when writing --------------------------------------------------------------
def linear_with_grid(bits, qmin, qmax, axis, group, scale_shape) -> nn.Module:
    model = nn.Sequential(nn.Linear(10, 6, bias=False))
    c = ensure_constraint(model[0])
    c.set_quant(bits, qmin, qmax, torch.full(scale_shape, 0.1), torch.zeros(scale_shape), axis, group)
    return model


WRITE_REFUSALS = {
    "scale_per_tensor_as_channel": ((4, -7, 7, 0, None, (1, 10)), "scale has shape [1, 10]; a axis-0 grid"),
    "scale_too_few_groups": ((4, -7, 7, 0, 4, (6, 2)), "scale has shape [6, 2]; a axis-0 grid of a [6, 10] weight"),
    "scale_on_a_per_tensor_grid": ((4, -7, 7, None, None, (6, 1)), "a per-tensor grid of a [6, 10] weight has []"),
    "levels_beyond_bits": ((4, 0, 255, None, None, ()), "levels 0..255, which need 8 bits; its grid has 4"),
    "levels_empty": ((4, 3, 3, None, None, ()), "qmin 3 >= qmax 3"),
    "group_wider_than_inputs": ((4, -7, 7, 0, 11, (6, 1)), "group is 11, outside 1..10"),
    "group_per_tensor": ((4, -7, 7, None, 4, ()), "per-group scales (group 4) without a per-channel grid"),
}


@pytest.mark.parametrize("case", list(WRITE_REFUSALS))
def test_a_form_with_an_inconsistency_is_refused_before_it_is_written(case):
    args, why = WRITE_REFUSALS[case]
    with pytest.raises(LwpipeError, match=r"0\.weight") as e:
        encode_model(linear_with_grid(*args), None)
    assert why in str(e.value)


def test_a_grid_off_its_kinds_output_axis_is_refused_by_the_form():
    form = WeightForm("0.weight", "Conv1D", (8, 6), "float32", grid=Grid(8, -127, 127, axis=0))
    with pytest.raises(FormError, match="runs along axis 0, not along its output axis 1"):
        form.check()
    read_form = WeightForm("0.weight", None, (8, 6), "float32", grid=Grid(8, -127, 127, axis=0))
    read_form.check()  # a file does not say the kind: the module it fills does
    with pytest.raises(FormError, match="a Conv1D, has its output channels on axis 1"):
        read_form.fits("Conv1D")


def test_grid_values_that_are_no_finite_weights_are_refused():
    grid = Grid(8, -127, 127, axis=0)
    form = WeightForm("0.weight", "Linear", (2, 2), "float32", grid=grid)
    form.check_tensors(torch.full((2, 1), 0.5), torch.zeros(2, 1))
    with pytest.raises(FormError, match="a grid scale is -0.5"):
        form.check_tensors(torch.full((2, 1), -0.5), torch.zeros(2, 1))
    with pytest.raises(FormError, match="give non-finite weights"):
        form.check_tensors(torch.full((2, 1), 3e38), torch.zeros(2, 1))
    with pytest.raises(FormError, match="zp has shape \\[2\\]"):
        form.check_tensors(torch.full((2, 1), 0.5), torch.zeros(2))


# -- inconsistent forms: refused when reading ---------------------------------------------------------------
def test_a_file_declaring_levels_beyond_its_bits_is_refused(tmp_path):
    data = grid_file(qmax=300)  # 8 bits declared, levels -300..300 need 10
    with pytest.raises(ArtifactError, match=r"layer '0\.weight' grid has levels -300\.\.300, which need 10 bits"):
        read(data)
    read(grid_file(qmax=127))  # the same file within its bits reads


def test_the_deployable_levels_of_a_conv1d_are_out_by_in_at_every_granularity():
    for per_channel in (False, True):
        torch.manual_seed(0)
        model = hf_conv1d()
        quantize_layer(model[0], 8, "symmetric", per_channel=per_channel)
        w, levels, scale, info = layer_grid(model[0])
        assert w.shape == levels.shape == scale.shape == (6, 8)  # weight [in 8, out 6]: (out, in)
        assert torch.equal(levels * scale, model[0].weight.detach().T)
        assert info["per_tensor"] != per_channel and info["scheme"] == "symmetric"


def test_inspect_names_the_files_own_format_version(tmp_path):
    from lwpipe.artifact.inspect import describe

    for group, version in ((None, 1), (4, 2)):  # version 2 only where a grid has groups
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 6))
        quantize_layer(model[0], 4, "symmetric", per_channel=True, group=group)
        (tmp_path / "model.lwp").write_bytes(encode_model(model, None))
        assert f"format version {version}," in describe(str(tmp_path / "model.lwp")).splitlines()[0]
