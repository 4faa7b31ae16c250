"""Deployable forms for runtimes outside PyTorch, written by the `export` stage into `<run>/export/`.

    onnx                 export/model.onnx                 ONNX Runtime (lwpipe.deploy.onnx)
    compressed_tensors   export/compressed_tensors/         transformers / vLLM (lwpipe.deploy.compressed_tensors)
    gguf                 export/model.gguf                  llama.cpp (lwpipe.deploy.gguf)

Each writer is a module imported only when its format is asked for (its packages are the `deploy` extra),
with three functions, the two checks run before any stage:

    check_order(cfg, before) -> str | None   why the earlier pipeline steps (`before`: .name, .type, .config)
                                             make a grid this format cannot hold, or None
    check_model(cfg, model, path) -> None    raise ConfigError(path, format, why) when this model (its family,
                                             its task's head) cannot have the format
    write(model, ctx, cfg, out) -> dict      write the form under `out` (the run's export/ directory) from the
                                             compressed model (its constraints still attached: the levels are
                                             read from them), and return what export.json records under the
                                             format's name (file, bytes, quality against the uncompressed
                                             reference, ...)
"""

from __future__ import annotations

import importlib
from types import ModuleType

from lwpipe.errors import ConfigError

WRITERS = {
    "onnx": "lwpipe.deploy.onnx",
    "compressed_tensors": "lwpipe.deploy.compressed_tensors",
    "gguf": "lwpipe.deploy.gguf",
}
EXTRA = "pip install 'lwpipe[deploy]'"


def writer(fmt: str, path: str = "stages.export.format") -> ModuleType:
    """The writer module of a deployable format; ConfigError when its packages are not installed."""
    try:
        return importlib.import_module(WRITERS[fmt])
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("lwpipe"):
            raise
        raise ConfigError(path, fmt, f"needs the package {e.name!r}, which is not installed ({EXTRA})") from e
