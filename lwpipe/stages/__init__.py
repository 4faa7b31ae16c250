"""Built-in stages, imported explicitly so that each registers itself."""
from lwpipe.stages import prune, train  # noqa: F401
