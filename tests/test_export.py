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
