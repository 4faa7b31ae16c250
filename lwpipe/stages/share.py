"""Stage `share`: k-means weight sharing (Deep Compression, Han et al. 2016).

Per layer, the non-zero weights are clustered into 2^bits centroids with a
1-D k-means (lwpipe.kmeans); the layer then computes `centroids[index] * mask`.
Pruned zeros stay exactly zero and are not a cluster. The original weight is
frozen: fine-tuning trains the centroids (and biases), and autograd's indexing
sums dL/dW over each cluster's members, which is Deep Compression's grouped
centroid gradient. The index map and the mask never change afterwards.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from lwpipe.constraints import (
    check_layer_patterns,
    compressible_layers,
    constraint,
    ensure_constraint,
    index_dtype,
    layer_setting,
    original_weight,
    release_original,
    tied_layers,
)
from lwpipe.context import Context
from lwpipe.errors import LwpipeError
from lwpipe.kmeans import kmeans_1d
from lwpipe.settings import LayerShare, Strict, TrainSettings
from lwpipe.stages.base import Stage
from lwpipe.stages.registry import register
from lwpipe.training import finetune


class ShareConfig(Strict):
    bits: int = Field(5, ge=1, le=16)  # 2^bits centroids per layer
    init: Literal["linear", "density", "random", "kmeans++"] = "linear"
    iters: int = Field(30, ge=1, le=10_000)  # Lloyd steps
    layers: dict[str, LayerShare] = {}  # by module name or glob: "fc3", "conv*"
    finetune: TrainSettings = TrainSettings()  # trains centroids and biases


@torch.no_grad()
def share_layer(module: nn.Module, bits: int, init: str = "linear", iters: int = 30, seed: int = 0, tied=()) -> None:
    """Replace the layer's weight by a 2^bits codebook over its non-zero weights (`tied`: the modules
    sharing this weight, which get the same constraint)."""
    c = ensure_constraint(module, tied)
    if c.quantized:
        raise ValueError("a quantized layer cannot be shared: k-means centroids would leave its grid")
    # unshared, the stored weight is the effective one (prune zeroes it too): no dense copy computed
    w = module.weight.detach() if c.shared else original_weight(module).detach()
    if c.mask is None:
        c.set_mask(w != 0)  # zeros (from any source) stay zeros and are not clustered
    # numpy's boolean indexing copies the kept values only; torch's first builds int64 positions (8x the mask)
    values = torch.from_numpy(w.float().cpu().numpy()[c.mask.cpu().numpy()])  # k-means in float32 (bf16 too)
    del w
    k = 1 << bits
    if values.numel() < 64 * k:  # a codebook near the value count: more centroids than values only cost bytes
        k = min(k, max(1, int(torch.unique(values).numel())))
    centroids, idx = kmeans_1d(values, k, init, iters, seed)
    del values
    index = torch.zeros(c.shape, dtype=index_dtype(centroids.numel()))
    index.masked_scatter_(c.mask.cpu(), idx.to(index.dtype))  # in mask order, as values were taken
    c.set_codebook(index.to(c.mask.device), centroids.to(c.mask.device))
    release_original(module)  # frozen and never read again: only the centroids train from now on


@register("share")
class Share(Stage):
    Config = ShareConfig
    leaves = ("codebook",)
    refuses = {
        "grid": "share after quantize would move the weights off the integer grid that quantize set "
        "(k-means centroids are arbitrary floats); put share before quantize, which then "
        "quantizes the codebook"
    }
    needs_reference = False  # one-shot unless it fine-tunes

    @classmethod
    def trains_with(cls, cfg: ShareConfig) -> bool:
        return cfg.finetune.epochs > 0

    @staticmethod
    def check_model(cfg: ShareConfig, model: nn.Module, path: str) -> None:
        check_layer_patterns(model, cfg.layers, path)
        quantized = [
            n
            for n, m in compressible_layers(model)
            if (c := constraint(m)) is not None and c.quantized and not layer_setting(n, cfg.layers, LayerShare()).skip
        ]
        if quantized:  # a model.checkpoint saved after quantize
            raise LwpipeError(
                f"model.checkpoint holds quantized layers ({', '.join(quantized)}) and {path} "
                "cannot follow quantize (k-means centroids would leave the grid); start from a "
                "checkpoint saved before quantize, or take share out of the pipeline"
            )

    def run(self, model: nn.Module, ctx: Context) -> nn.Module:
        ties = tied_layers(model)
        for name, m in compressible_layers(model):
            lc = layer_setting(name, self.cfg.layers, LayerShare(), [t for t, _ in ties.get(name, ())])
            if lc.skip:
                continue
            seed = int(torch.randint(2**31 - 1, ()).item())  # the runner seeds each stage
            share_layer(m, lc.bits or self.cfg.bits, self.cfg.init, self.cfg.iters, seed, ties.get(name, ()))
        return finetune(model, ctx, self.cfg.finetune)
