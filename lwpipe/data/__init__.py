from lwpipe.data.bundle import DataBundle
from lwpipe.data.digits import load_digits
from lwpipe.data.mnist import load_mnist
from lwpipe.data.synthetic import load_blobs

__all__ = ["DataBundle", "load_blobs", "load_digits", "load_mnist"]
