from lwpipe.data.bundle import DataBundle
from lwpipe.data.digits import load_digits
from lwpipe.data.mnist import load_mnist
from lwpipe.data.synthetic import load_blobs
from lwpipe.data.textures import load_textures

__all__ = ["DataBundle", "load_blobs", "load_digits", "load_mnist", "load_textures"]
