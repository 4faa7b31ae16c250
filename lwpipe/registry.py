"""The stage registry under its older name: `lwpipe.registry` is lwpipe/stages/registry.py itself (the same
module object, so `from lwpipe.registry import register` in a plugin registers where lwpipe looks)."""

import sys

from lwpipe.stages import registry as _registry

sys.modules[__name__] = _registry
