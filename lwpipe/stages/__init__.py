"""Built-in stages, imported explicitly so that each registers itself."""

from lwpipe.stages import distill, export, factorize, prune, quantize, share, train  # noqa: F401
