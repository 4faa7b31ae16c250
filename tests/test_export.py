import torch
from torch.ao.nn.quantized import Linear as QuantizedLinear

from lwpipe.config import TrainSettings
from lwpipe.constraints import ensure_constraint
from lwpipe.context import Context
from lwpipe.data import load_blobs
from lwpipe.export import bake, to_int8
from lwpipe.models import LeNet300
from lwpipe.training import fit


def test_int8_export_runs_real_int8_kernels_and_keeps_predictions(tmp_path):
    torch.manual_seed(0)
    ctx = Context(data=load_blobs(n=512, num_features=16), seed=0, run_dir=tmp_path)
    model = LeNet300(in_features=16, num_classes=4)
    fit(model, ctx.train_loader(), TrainSettings(epochs=10, lr=1e-2))
    ensure_constraint(model.fc1).set_mask(model.fc1.weight.detach().abs() > 0.02)
    plain = bake(model, LeNet300(in_features=16, num_classes=4))
    assert torch.equal(plain.fc1.weight, model.fc1.weight)
    q = to_int8(plain, ctx.data.train.tensors[0][:256])
    assert isinstance(q.fc1, QuantizedLinear) and q.fc1.weight().dtype == torch.qint8
    x = ctx.data.test.tensors[0]
    with torch.no_grad():
        agree = (q(x).argmax(1) == model(x).argmax(1)).float().mean().item()
    assert agree > 0.95


def _sparsified(model, sparsity):
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight[torch.rand_like(m.weight) < sparsity] = 0
    return model.eval()


def test_sparse_form_fuses_a_linear_run_into_one_chain_with_the_same_outputs():
    from lwpipe import export
    from lwpipe.models import LeNet300

    torch.manual_seed(0)
    model = _sparsified(LeNet300(784), 0.9)
    form, names = export.sparse_form(model, 0.8, min_batch=16)
    assert names == ["fc1", "fc2", "fc3"]
    chains = [n for n, _ in form.named_children() if n.startswith("sparse_chain")]
    assert chains == ["sparse_chain0"]  # fc1 -> relu -> fc2 -> relu -> fc3: one transpose in, one out
    with torch.no_grad():
        for batch in (1, 15, 16, 64):  # dense below min_batch, CSR from it
            x = torch.randn(batch, 1, 28, 28)
            torch.testing.assert_close(form(x), model(x), rtol=1e-5, atol=1e-5)


def test_sparse_chain_keeps_leading_dims_activations_and_dense_members():
    from lwpipe import export

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8)
    )
    _sparsified(mlp[0], 0.9)  # only the first is sparse: the others join the chain as dense members
    form, names = export.sparse_form(mlp, 0.8, min_batch=4)
    assert names == ["0"]
    assert not any(isinstance(m, torch.nn.Linear) for m in form.modules())  # all three inside the chain
    x = torch.randn(3, 5, 16)  # (batch, tokens, features): 15 rows, CSR path
    with torch.no_grad():
        torch.testing.assert_close(form(x), mlp(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(form(x[:1, :2]), mlp(x[:1, :2]), rtol=1e-5, atol=1e-5)  # 2 rows: dense path


def test_a_setting_only_another_form_reads_is_refused():
    from lwpipe.stages.export import Export, ExportConfig

    why = Export.check_order(ExportConfig(smooth=0.5), [])
    assert why == (
        "smooth=0.5 is set but format=dense: smooth is only used by format=onnx; add onnx to format or drop smooth"
    )
    assert "gguf_type" in Export.check_order(ExportConfig(format=["onnx"], gguf_type="q4_0"), [])
    both = ExportConfig(format=["onnx", "gguf"], gguf_type="q4_0", requantize=True, smooth=0.5)
    assert Export.check_order(both, []) is None
