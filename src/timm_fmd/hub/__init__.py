"""Publishing trained runs to the Hugging Face Hub as timm models, with model cards and FMD settings."""
from .card import RunRecord, model_card, read_run
from .publish import (PublishError, fmd_kwargs, load_fmd_settings, publish, push_to_hub, read_config, save_pretrained,
                      validate_dataset_id, validate_repo_id)
from .stats import model_stats

__all__ = ['RunRecord', 'model_card', 'model_stats', 'read_run', 'PublishError', 'fmd_kwargs', 'load_fmd_settings',
           'publish', 'read_config', 'push_to_hub', 'save_pretrained', 'validate_dataset_id', 'validate_repo_id']
