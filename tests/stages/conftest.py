"""A tiny trained model and its context, shared by the stage tests."""

import pytest
import torch

from lwpipe.config import TrainSettings
from lwpipe.context import Context
from lwpipe.data import load_blobs
from lwpipe.models import TinyMLP
from lwpipe.training import fit


@pytest.fixture
def ctx(tmp_path):
    return Context(data=load_blobs(n=256), seed=0, run_dir=tmp_path)


@pytest.fixture
def model(ctx):
    torch.manual_seed(0)
    m = TinyMLP()
    fit(m, ctx.train_loader(), TrainSettings(epochs=5, lr=1e-2))
    return m
