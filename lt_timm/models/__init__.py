"""Models registered in timm's registry on import: CIFAR ResNets (option A) and DenseNet-40."""
from .cifar_resnet import CifarResNet, checkpoint_filter_fn, CIFAR_RESNET_DEPTHS
from .cifar_densenet import CifarDenseNet
from .torchvision_v1 import TvMobileNetV2, TvEfficientNetB0, TvViTB16
