"""Models registered in timm's registry on import: CIFAR ResNets (option A), DenseNet-40, torchvision V1 models, and
timm's tf_efficientnet_* re-registered to load EfficientNet-PyTorch checkpoints."""
from .cifar_resnet import CifarResNet, checkpoint_filter_fn, CIFAR_RESNET_DEPTHS
from .cifar_densenet import CifarDenseNet
from .torchvision_v1 import TvMobileNetV2, TvEfficientNetB0, TvViTB16
from .efficientnet import convert_efficientnet_pytorch, package_weights_file
from .keras_applications import read_keras_weights, load_keras_weights, mobilenetv2_plan
from .nasnet import NASNetAMobile, keras_plan
