"""Model statistics for the card, as timm's cards give them: parameters, GMACs and activations per image."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['model_stats']


class _ActivationCounter(TorchDispatchMode):
    """Counts output elements of convolutions and matrix products: the 'Activations (M)' of timm's model cards
    (fvcore's activation count, which timm's benchmark script reports)."""
    _OPS = {torch.ops.aten.convolution, torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in self._OPS:
            self.count += out.numel()
        return out


def model_stats(model: nn.Module, input_size: tuple[int, int, int]) -> dict[str, Any]:
    """Parameters (M), GMACs and activations (M) for one image of ``input_size`` (C, H, W), and the shape of the
    unpooled features. MACs are half of ``FlopCounterMode``'s FLOPs (a multiply-add counts two FLOPs there).
    The image is made on the model's device (a model on a GPU is measured there)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device('cpu')
    was_training = model.training
    flop_counter, activation_counter = FlopCounterMode(display=False), _ActivationCounter()
    try:
        with torch.no_grad(), flop_counter, activation_counter:
            features = model.eval().forward_features(torch.zeros(1, *input_size, device=device))
            model.forward_head(features)
    finally:
        model.train(was_training)
    return {'params_m': sum(p.numel() for p in model.parameters()) / 1e6,
            'gmacs': flop_counter.get_total_flops() / 2e9,
            'activations_m': activation_counter.count / 1e6,
            'features_shape': tuple(features.shape)}
