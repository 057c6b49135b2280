"""The timm-fmd trainer: ``fit(TrainConfig(...))`` or ``timm-fmd train``; see ``loop.py`` for the flow."""
from .config import TrainConfig, config_from_dict, load_yaml, merge, validate
from .evaluate import evaluate_checkpoint
from .loop import fit
from .report import plot_comparison, plot_curves

__all__ = ['TrainConfig', 'fit', 'evaluate_checkpoint', 'load_yaml', 'merge', 'validate', 'config_from_dict',
           'plot_curves', 'plot_comparison']
