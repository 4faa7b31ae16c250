"""k-means sharing of a real sentence encoder, one shot: cosine of its embeddings to the original's.

    python benchmarks/bench_sentence_share.py DIR [init ...]    # DIR: a sentence-transformers directory

Every Linear layer shared to 5 bits (then its codebook on an 8-bit grid), no training; 96 test
sentences of the built-in corpus (pydoc_data.topics). Used to pick the text recipes' `init: density`.
"""

import sys
import time

import torch

from lwpipe.constraints import clone, compressible_layers
from lwpipe.data.text import load_text
from lwpipe.models.sentence import load_sentence_transformer
from lwpipe.stages.quantize import quantize_layer
from lwpipe.stages.share import share_layer
from lwpipe.tasks import make_task


def main() -> None:
    path, inits = sys.argv[1], sys.argv[2:] or ["linear", "density"]
    torch.set_num_threads(1)
    ref = load_sentence_transformer(path)[0]
    batches = load_text(tokenizer=path, task="embedding", limit_train=8, limit_test=96, max_length=64).test.batches(32)
    task = make_task("embedding")
    _, emb = task.evaluate(ref, batches)
    for init in inits:
        model, t = clone(ref), time.perf_counter()
        for _, layer in compressible_layers(model):
            share_layer(layer, 5, init, 30, 0)
        shared = task.evaluate(model, batches, emb)[0]["cosine"]
        for _, layer in compressible_layers(model):
            quantize_layer(layer, 8)
        grid = task.evaluate(model, batches, emb)[0]["cosine"]
        print(
            f"init={init:<8} 5-bit share: cosine {shared:.4f}   + 8-bit codebook: {grid:.4f}   "
            f"({time.perf_counter() - t:.0f} s)"
        )


if __name__ == "__main__":
    main()
