from lwpipe.models.lenet import LeNet5, LeNet300

__all__ = ["LeNet300", "LeNet5"]
