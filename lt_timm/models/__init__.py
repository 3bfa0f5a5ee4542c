"""timm-registered extra models (importing this registers them)."""
from .cifar_resnet import cifar_resnet20, cifar_resnet56, cifar_resnet110, CifarResNet
