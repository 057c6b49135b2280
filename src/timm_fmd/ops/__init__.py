"""The op: Feature Map Distortion and what it is made of (Tang et al., AAAI 2020).

Floors, bottom up: ``validation``, ``noise``, ``masks``, ``positions``, ``schedule``, ``next_layer`` -> ``erc`` ->
``kernels`` (Triton, imported lazily) -> ``fused`` (the CUDA path) -> ``distortion``.
Nothing here imports timm's model code; the registry and the trainer build on these modules.
"""
from .distortion import BlockFeatureMapDistortion, FeatureMapDistortion, feature_map_distortion
from .schedule import current_prob, schedule_step, set_schedule_step, step_schedule

__all__ = ['FeatureMapDistortion', 'BlockFeatureMapDistortion', 'feature_map_distortion', 'current_prob',
           'schedule_step', 'set_schedule_step', 'step_schedule']
