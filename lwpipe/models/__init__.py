from lwpipe.models.lenet import LeNet5, LeNet300
from lwpipe.models.resnet import ResNet
from lwpipe.models.tiny import TinyMLP

__all__ = ["LeNet300", "LeNet5", "ResNet", "TinyMLP"]
