"""timm-fmd: Feature Map Distortion (Tang et al., AAAI 2020, "Beyond Dropout") for timm."""
from .schedule import current_prob, schedule_step, set_schedule_step, step_schedule

__version__ = '0.1.0'
