"""The "conventional CNN" of FMD's Table 1 (Tang et al., AAAI 2020), registered in timm as ``paper_cnn``.

"Three convolutional layers with 96, 128 and 256 filters, respectively. Each layer consists of a
5x5 convolutional operation with stride 1 followed by a 3x3 max-pooling operation with stride 2.
Then the features are sent to two fully-connected layers with 2048 hidden units each." This is the
CIFAR network of the dropout paper (Srivastava et al., JMLR 2014), and like it has no batch
normalization: FMD's Table 1 measures what a regularizer adds to a plain network, and BN would be
a regularizer of its own. Each conv is followed by ReLU; pooling pads by 1, so a 32x32 image gives
16, 8 and 4 pixel maps (reductions 2, 4, 8).

timm's parts map onto the network the way they do for timm's VGG, whose fc6/fc7 live in a
``pre_logits`` block between the pooling and the classifier:

* ``forward_features`` runs the three conv stages: (B, 256, H/8, W/8); ``num_features`` is 256.
* ``forward_head`` runs ``global_pool``, the two FC stages, then the classifier ``fc``;
  ``pre_logits=True`` stops after the second FC stage, so ``head_hidden_size`` is 2048.
* ``global_pool=''`` (the default, the paper's network) flattens the 256 x 4 x 4 map into the 4096
  inputs of the first FC layer and fixes the input size to ``img_size``. Any timm pooling type
  ('avg', 'max', ...) pools instead, so fc1 takes 256 (x2 for 'catavgmax') inputs and any image
  size works. The pooling sets fc1's width, so ``reset_classifier`` cannot change it.
* ``reset_classifier`` replaces only the final classifier ``fc``; the FC stages are kept.
* ``drop_rate`` is classic dropout after each FC layer's ReLU (the paper's Dropout baseline).

FMD acts on the two FC layers in the paper, so ``feature_info`` lists them after the conv stages:
``stages.0`` .. ``stages.2`` (96/128/256 channels, reductions 2/4/8) and ``fc_stages.0``,
``fc_stages.1`` (2048 features each; reduction 8 x the final grid, i.e. one vector per image).
``features_only=True`` returns the three conv maps by default; ``out_indices=(3, 4)`` returns the
(B, 2048) FC outputs.
"""
import math
from collections import OrderedDict
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .cifar_resnet import CIFAR10_MEAN, CIFAR10_STD

__all__ = ['PaperCNN']

CONV_CHANNELS = (96, 128, 256)
FC_WIDTH = 2048
NUM_FC_STAGES = 2


def _conv_stage(in_chs: int, out_chs: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict([
        ('conv', nn.Conv2d(in_chs, out_chs, kernel_size=5, stride=1, padding=2)),
        ('act', nn.ReLU(inplace=True)),
        ('pool', nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
    ]))


def _fc_stage(in_features: int, out_features: int, drop_rate: float) -> nn.Sequential:
    return nn.Sequential(OrderedDict([
        ('fc', nn.Linear(in_features, out_features)),
        ('act', nn.ReLU(inplace=True)),
        ('drop', nn.Dropout(drop_rate)),
    ]))


class PaperCNN(nn.Module):
    """Three 5x5 conv + max-pool stages and two 2048-unit FC layers, without normalization.

    Args:
        num_classes: Classifier outputs; 0 leaves the classifier as an identity.
        in_chans: Input image channels.
        img_size: Input side the network is built for; sets fc1's width when ``global_pool=''``.
        global_pool: '' flattens the last conv map (the paper); a timm pooling type pools it.
        drop_rate: Dropout after each FC layer.
        conv_widths: Filters of the three conv stages (the paper: 96, 128, 256).
        fc_width: Units of each of the two FC layers (the paper: 2048).
    """

    def __init__(
            self,
            num_classes: int = 10,
            in_chans: int = 3,
            img_size: int = 32,
            global_pool: str = '',
            drop_rate: float = 0.,
            conv_widths: Sequence[int] = CONV_CHANNELS,
            fc_width: int = FC_WIDTH,
    ) -> None:
        super().__init__()
        conv_widths = tuple(conv_widths)
        if len(conv_widths) != len(CONV_CHANNELS) or not all(isinstance(w, int) and w >= 1 for w in conv_widths):
            raise ValueError(f'conv_widths must be {len(CONV_CHANNELS)} positive ints, got {conv_widths!r}')
        if not isinstance(fc_width, int) or fc_width < 1:
            raise ValueError(f'fc_width must be a positive int, got {fc_width!r}')
        if not isinstance(img_size, int) or img_size < 1:
            raise ValueError(f'img_size must be a positive int, got {img_size!r}')
        if not 0. <= drop_rate < 1.:
            raise ValueError(f'drop_rate must be in [0, 1), got {drop_rate!r}')
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.img_size = img_size
        # each padded 3x3/2 pool maps a side s to ceil(s / 2)
        self.grid_size = math.ceil(img_size / 2 ** len(conv_widths))
        self.fc_width = fc_width

        stages = []
        self.feature_info = []
        in_chs = in_chans
        for i, out_chs in enumerate(conv_widths):
            stages.append(_conv_stage(in_chs, out_chs))
            self.feature_info.append(dict(num_chs=out_chs, reduction=2 ** (i + 1), module=f'stages.{i}'))
            in_chs = out_chs
        self.stages = nn.Sequential(*stages)
        self.num_features = in_chs

        # Registered in forward order (pool, FC stages, classifier) so timm's FeatureListNet can run them.
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        in_features = self.num_features * self.global_pool.feat_mult()
        if self.global_pool.is_identity():
            in_features *= self.grid_size ** 2
        fc_stages = []
        for i in range(NUM_FC_STAGES):
            fc_stages.append(_fc_stage(in_features, fc_width, drop_rate))
            self.feature_info.append(dict(
                num_chs=fc_width, reduction=2 ** len(conv_widths) * self.grid_size, module=f'fc_stages.{i}'))
            in_features = fc_width
        self.fc_stages = nn.Sequential(*fc_stages)
        self.head_hidden_size = fc_width
        self.fc = nn.Linear(fc_width, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.jit.ignore
    def init_weights(self) -> None:
        """Glorot-uniform weights and zero biases (Glorot & Bengio 2010), the norm of that era's plain nets.

        Without BN the init sets the signal scale. He-normal weights grow the activations ~1.3x per
        conv stage (each 3x3 max-pool raises the mean square), and at the paper's lr 0.01 (momentum 0.9)
        the loss jumped from 2.9 to 15 on the second step of a CIFAR-10 probe (64 steps of batch 32); Glorot was
        stable there and reached the lowest loss of He, Glorot, torchvision-VGG and torch's default init.
        """
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the final classifier only; the FC stages (and so the pooling) are kept."""
        if global_pool is not None and global_pool != self.global_pool.pool_type:
            raise ValueError(
                f'global_pool cannot change from {self.global_pool.pool_type!r} to {global_pool!r}: '
                f'it sets the width of fc_stages.0; pass None or {self.global_pool.pool_type!r}')
        self.num_classes = num_classes
        self.fc = nn.Linear(self.fc_width, num_classes) if num_classes > 0 else nn.Identity()
        self.fc.train(self.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool.is_identity() and tuple(x.shape[-2:]) != (self.grid_size,) * 2:
            raise ValueError(
                f'with global_pool=\'\' the FC stages take a {self.grid_size}x{self.grid_size} map '
                f'(img_size={self.img_size}), got {tuple(x.shape[-2:])}; '
                f'build with the input\'s img_size or a pooling global_pool such as \'avg\'')
        x = self.fc_stages(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs({
    'paper_cnn': {
        'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (4, 4),
        'crop_pct': 1.0, 'interpolation': 'bilinear',
        'mean': CIFAR10_MEAN, 'std': CIFAR10_STD,
        'first_conv': 'stages.0.conv', 'classifier': 'fc',
    },
})


@register_model
def paper_cnn(pretrained: bool = False, **kwargs) -> PaperCNN:
    """FMD's Table 1 conventional CNN (96/128/256 5x5 convs, two 2048-unit FC layers): 13.7M parameters."""
    # Five feature stages, but features_only defaults to the three spatial ones; FC outputs via out_indices.
    return build_model_with_cfg(
        PaperCNN, 'paper_cnn', pretrained,
        feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2)),
        **kwargs,
    )
