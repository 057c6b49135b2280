import pytest
import torch.nn as nn

from timm_fmd.ops.schedule import LinearRamp, current_prob, schedule_step, set_schedule_step, step_schedule


def test_linear_ramp_values():
    ramp = LinearRamp(0.2, 4)
    values = []
    for _ in range(6):
        values.append(ramp.value)
        ramp.advance()
    assert values == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2, 0.2])
    assert LinearRamp(0.3, 0).value == 0.3
    with pytest.raises(ValueError, match='ramp_steps must be an int >= 0, got -1'):
        LinearRamp(0.1, -1)
    with pytest.raises(ValueError, match='step must be >= 0'):
        ramp.set(-2)


def test_model_level_helpers():
    class Holder(nn.Module):
        def __init__(self, target, steps):
            super().__init__()
            self.ramp = LinearRamp(target, steps)

    model = nn.Sequential(Holder(0.1, 10), nn.Sequential(Holder(0.4, 10)), nn.ReLU())
    assert schedule_step(model) == 0 and current_prob(model) == 0.0
    step_schedule(model, 5)
    assert schedule_step(model) == 5 and current_prob(model) == pytest.approx(0.2)
    assert all(m.ramp.driven for m in model.modules() if hasattr(m, 'ramp'))
    set_schedule_step(model, 10)
    assert current_prob(model) == pytest.approx(0.4)
    assert schedule_step(nn.ReLU()) is None and current_prob(nn.ReLU()) is None
