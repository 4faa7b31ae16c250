from lwpipe.data.bundle import DataBundle
from lwpipe.data.digits import load_digits
from lwpipe.data.mnist import load_mnist

__all__ = ["DataBundle", "load_digits", "load_mnist"]
