"""CIFAR ResNets (He et al. 2016), registered in timm's model registry.

The 6n+2-layer networks of Sec. 4.2 of "Deep Residual Learning for Image Recognition"
(He et al., CVPR 2016): a 3x3 conv stem with 16 channels, three stages of n basic blocks with
16/32/64 channels (stride 2 at the first block of stages 2 and 3), global average pooling and a
linear classifier. Two block flavours:

* ``cifar_resnet{20,32,44,56,110}``: post-activation blocks as in the original paper
  (conv-bn-relu-conv-bn, add, relu) with a 1x1 conv + BN projection shortcut where the shape
  changes ("option B"). The block keeps the layout of timm's ``resnet.BasicBlock``, including its
  ``drop_block`` slot after ``bn1``.
* ``cifar_preresnet{20,32,44,56,110}``: pre-activation blocks of "Identity Mappings in Deep
  Residual Networks" (He et al., ECCV 2016), the ResNet-56 of FMD's Table 2 (Tang et al., AAAI
  2020). Laid out like the FMD authors' release (huawei-noah/Disout, models/resnet.py): a bare conv
  stem, bn-relu-conv-bn-relu-conv blocks whose projection shortcut is a 1x1 conv without BN taking
  the block's raw input, and a final bn-relu before pooling. The two regularizer slots,
  ``drop_block1`` after ``conv1`` and ``drop_block2`` after ``conv2``, are where the authors put
  Disout and where the paper applies DropBlock ("after each convolution layer in the last group").

``drop_block_rate`` fills those slots in the last stage with timm's ``DropBlock2d`` (block size 6
as in FMD's Table 2); ``drop_path_rate`` adds stochastic depth with timm's linear decay rule;
``drop_rate`` is dropout before the classifier. ``feature_info`` lists the three stage containers
``stages.0`` .. ``stages.2`` (reductions 1, 2, 4); the stem is not a feature stage.
"""
import os
from collections import OrderedDict
from functools import partial
from typing import Callable, Dict, List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, DropBlock2d, DropPath, create_classifier
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model

__all__ = ['CIFAR10_MEAN', 'CIFAR10_STD', 'BasicBlock', 'PreActBasicBlock', 'CifarResNet']

# Per-channel statistics of the CIFAR-10 training set (pixel values scaled to [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

STAGE_CHANNELS = (16, 32, 64)


def _conv3x3(in_chs: int, out_chs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False)


def _slot(layer: Optional[Callable[[], nn.Module]]) -> nn.Module:
    """An optional regularizer slot: the layer if one is given, else an ``nn.Identity`` placeholder."""
    return layer() if layer is not None else nn.Identity()


class BasicBlock(nn.Module):
    """Post-activation basic block (He et al. 2016, Fig. 2 left), in timm's ``BasicBlock`` layout.

    conv1 -> bn1 -> drop_block -> act1 -> conv2 -> bn2 -> drop_path -> + shortcut -> act2, with a
    1x1 conv + BN projection shortcut when the stride or the width changes.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            stride: int = 1,
            drop_block: Optional[Callable[[], nn.Module]] = None,
            drop_path: float = 0.,
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_chs, out_chs, stride)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.drop_block = _slot(drop_block)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(out_chs, out_chs)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_chs),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.drop_block(self.bn1(self.conv1(x))))
        x = self.drop_path(self.bn2(self.conv2(x)))
        return self.act2(x + shortcut)


class PreActBasicBlock(nn.Module):
    """Pre-activation basic block (He et al., ECCV 2016, Fig. 1b), as in the FMD authors' release.

    bn1 -> act1 -> conv1 -> drop_block1 -> bn2 -> act2 -> conv2 -> drop_block2 -> drop_path,
    plus the shortcut: the raw input, or a 1x1 conv of it (no BN) when the stride or width changes.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            stride: int = 1,
            drop_block: Optional[Callable[[], nn.Module]] = None,
            drop_path: float = 0.,
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = _conv3x3(in_chs, out_chs, stride)
        self.drop_block1 = _slot(drop_block)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(out_chs, out_chs)
        self.drop_block2 = _slot(drop_block)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.drop_block1(self.conv1(self.act1(self.bn1(x))))
        x = self.drop_block2(self.conv2(self.act2(self.bn2(x))))
        return self.drop_path(x) + shortcut


class CifarResNet(nn.Module):
    """6n+2-layer CIFAR ResNet, post-activation (He et al. 2016) or pre-activation (ECCV 2016).

    Args:
        depth: Number of weighted layers, 6n + 2 with n >= 1 blocks per stage (20, 32, 44, 56, 110).
        preact: Pre-activation blocks, bare conv stem and a final bn-relu instead of post-activation.
        num_classes: Classifier outputs; 0 leaves the classifier as an identity.
        in_chans: Input image channels.
        global_pool: timm pooling type ('avg', 'max', 'avgmax', 'catavgmax', or '' for none).
        drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic depth rate of the last block, decayed linearly to 0 at the first.
        drop_block_rate: DropBlock drop probability in the last stage's regularizer slots.
        drop_block_size: DropBlock block size (6 in FMD's Table 2; clipped to the 8x8 map by timm).
    """

    def __init__(
            self,
            depth: int = 20,
            preact: bool = False,
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            drop_block_rate: float = 0.,
            drop_block_size: int = 6,
    ) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f'depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth!r}')
        for name, rate in (('drop_rate', drop_rate), ('drop_path_rate', drop_path_rate),
                           ('drop_block_rate', drop_block_rate)):
            if not 0. <= rate < 1.:
                raise ValueError(f'{name} must be in [0, 1), got {rate!r}')
        if not isinstance(drop_block_size, int) or drop_block_size < 1:
            raise ValueError(f'drop_block_size must be a positive int, got {drop_block_size!r}')
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        block_cls = PreActBasicBlock if preact else BasicBlock
        blocks_per_stage = (depth - 2) // 6

        stem = [('conv', _conv3x3(in_chans, STAGE_CHANNELS[0]))]
        if not preact:  # the pre-activation stem's bn-relu is the first block's bn1-act1
            stem += [('bn', nn.BatchNorm2d(STAGE_CHANNELS[0])), ('act', nn.ReLU(inplace=True))]
        self.stem = nn.Sequential(OrderedDict(stem))

        # DropBlock only in the last stage, as FMD's Table 2 and timm's resnet (its last stages) do.
        last_stage_drop_block = None
        if drop_block_rate:
            last_stage_drop_block = partial(DropBlock2d, drop_prob=drop_block_rate, block_size=drop_block_size)
        num_blocks = 3 * blocks_per_stage
        stages = []
        self.feature_info = []
        in_chs, reduction, block_idx = STAGE_CHANNELS[0], 1, 0
        for stage_idx, out_chs in enumerate(STAGE_CHANNELS):
            stride = 1 if stage_idx == 0 else 2
            reduction *= stride
            drop_block = last_stage_drop_block if stage_idx == len(STAGE_CHANNELS) - 1 else None
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(block_cls(
                    in_chs,
                    out_chs,
                    stride=stride if i == 0 else 1,
                    drop_block=drop_block,
                    drop_path=drop_path_rate * block_idx / (num_blocks - 1),  # timm's linear decay rule
                ))
                in_chs = out_chs
                block_idx += 1
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f'stages.{stage_idx}'))
        self.stages = nn.Sequential(*stages)
        self.num_features = in_chs
        self.norm = BatchNormAct2d(in_chs) if preact else nn.Identity()
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.init_weights()

    @torch.jit.ignore
    def init_weights(self) -> None:
        """He-normal (fan-out) convolutions as in He et al. and the Disout release; BN and fc keep torch's init."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        """Parameter groups for timm's layer-wise LR decay: stem, stages (or blocks; the final norm joins the last)."""
        return dict(
            stem=r'^stem',
            blocks=[(r'^stages\.(\d+)' if coarse else r'^stages\.(\d+)\.(\d+)', None), (r'^norm', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the pooling/classifier pair with a fresh one for ``num_classes`` outputs."""
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x)
        else:
            x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_cifar_resnet(variant: str, pretrained: bool = False, **kwargs) -> CifarResNet:
    # flatten_sequential exposes stages.0..2 to timm's FeatureListNet; three feature stages, not timm's five.
    return build_model_with_cfg(
        CifarResNet, variant, pretrained,
        feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2)),
        **kwargs,
    )


def _cfg(**kwargs) -> Dict:
    return {
        'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (8, 8),
        'crop_pct': 1.0, 'interpolation': 'bilinear',
        'mean': CIFAR10_MEAN, 'std': CIFAR10_STD,
        'first_conv': 'stem.conv', 'classifier': 'fc',
        **kwargs,
    }


DEPTHS = (20, 32, 44, 56, 110)
_DOCS = {'resnet': 'ResNet-{depth} for CIFAR, post-activation (He et al. 2016)',
         'preresnet': 'Pre-activation ResNet-{depth} for CIFAR (He et al., ECCV 2016; the depth-56 one is the '
                      'network of FMD\'s Table 2)'}


# Checkpoints this project trained and publishes, as pretrained tags: `timm-fmd publish` puts each in the
# Hub repository <HUB_ORG>/<arch>.<tag>, and model_cards/<arch>.<tag>/ holds that repository's folder
# (weights, config.json, card with the run's measured numbers). The organisation is a setting:
# TIMM_FMD_HUB_ORG in the environment when timm_fmd is imported (default 'timm-fmd').
HUB_ORG = os.environ.get('TIMM_FMD_HUB_ORG', 'timm-fmd')
PUBLISHED = {
    'cifar_resnet20.bfmd_cifar10': dict(
        label_names=('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck'),
        license='apache-2.0',
        description='block FMD (p=0.1, block 3, gamma 30) in the last stage, trained 6 epochs (cosine, lr 0.1, '
                    'crop+flip+rotate) on CIFAR-10 on 2 CPU cores: a short schedule, 72% test top-1'),
    'cifar_resnet20.bfmd_digits': dict(
        label_names=tuple(str(i) for i in range(10)), license='apache-2.0',
        description='block FMD (p=0.1, block 3, gamma 30) in the last stage, trained 12 epochs on the 8x8 '
                    'UCI digits upscaled to 32x32 (the embedded default of `timm-fmd train`)'),
}

default_cfgs = generate_default_cfgs({
    # published tags first: the first tag of an architecture is its default
    **{name: _cfg(hf_hub_id=f'{HUB_ORG}/{name}', **extra) for name, extra in PUBLISHED.items()},
    **{f'cifar_{kind}{depth}': _cfg() for kind in _DOCS for depth in DEPTHS},
})


def _register(kind: str, depth: int) -> None:
    """Register ``cifar_<kind><depth>`` as a timm entrypoint of this module."""
    name = f'cifar_{kind}{depth}'

    def entrypoint(pretrained: bool = False, **kwargs) -> CifarResNet:
        return _create_cifar_resnet(name, pretrained, depth=depth, preact=kind == 'preresnet', **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = _DOCS[kind].format(depth=depth) + '.'
    globals()[name] = register_model(entrypoint)


for _kind in _DOCS:
    for _depth in DEPTHS:
        _register(_kind, _depth)
