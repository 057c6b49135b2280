"""timm-fmd: Feature Map Distortion (Tang et al., AAAI 2020, "Beyond Dropout") for timm.

``import timm_fmd`` registers the paper's architectures (``cifar_resnet*``, ``cifar_preresnet*``,
``paper_cnn``) and an ``fmd_<arch>`` twin of every timm architecture in timm's registry.
"""
__version__ = '0.1.0'

from .ops.distortion import BlockFeatureMapDistortion, FeatureMapDistortion, feature_map_distortion
from .inject import (FMDSettings, apply_fmd, describe, fmd_ops, fmd_settings, oversized_blocks, reapply_fmd,
                     remove_fmd, site_summary)
from .models import CifarResNet, PaperCNN  # registers the paper's architectures in timm
from .registry import base_architecture, register_fmd_models
from .ops.schedule import current_prob, schedule_step, set_schedule_step, step_schedule

from .factory import create_model  # noqa: E402  (after the registry: it builds fmd_ models)

register_fmd_models()
