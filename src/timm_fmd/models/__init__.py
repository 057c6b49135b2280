"""Architectures the FMD paper uses that timm lacks; importing this package registers them in timm.

``cifar_resnet{20,32,44,56,110}``, ``cifar_preresnet{20,32,44,56,110}`` and ``paper_cnn`` then work
with ``timm.create_model`` like any timm model.
"""
from .cifar_resnet import CIFAR10_MEAN, CIFAR10_STD, BasicBlock, CifarResNet, PreActBasicBlock
from .paper_cnn import PaperCNN

__all__ = ['CIFAR10_MEAN', 'CIFAR10_STD', 'BasicBlock', 'CifarResNet', 'PaperCNN', 'PreActBasicBlock']
