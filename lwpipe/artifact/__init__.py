"""The compressed artifact `model.lwp`: encode a compressed model to bytes, load it back exactly."""

from lwpipe.artifact.decode import load, read
from lwpipe.artifact.encode import encode_model, size_metrics
from lwpipe.artifact.format import ArtifactError

__all__ = ["ArtifactError", "encode_model", "load", "read", "size_metrics"]
