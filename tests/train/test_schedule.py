import pytest
import torch

from step3vl_train.train.config import ScheduleConfig
from step3vl_train.train.schedule import apply_schedule, lr_factor


def test_warmup_then_cosine_to_the_floor():
    cfg = ScheduleConfig(shape="cosine", warmup_tokens=100, decay_tokens=1100, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == 0 and lr_factor(50, cfg) == pytest.approx(0.5)
    assert lr_factor(100, cfg) == pytest.approx(1.0)
    assert lr_factor(600, cfg) == pytest.approx(0.55)  # half way down the cosine
    assert lr_factor(1100, cfg) == pytest.approx(0.1) and lr_factor(10**9, cfg) == pytest.approx(0.1)


def test_linear_and_constant():
    linear = ScheduleConfig(shape="linear", decay_tokens=900, min_lr_ratio=0.2)  # phase 1: 5e-5 -> 1e-5
    assert lr_factor(450, linear) * 5e-5 == pytest.approx(3e-5)
    assert lr_factor(900, linear) * 5e-5 == pytest.approx(1e-5)
    assert lr_factor(10, ScheduleConfig(shape="constant", warmup_tokens=20)) == pytest.approx(0.5)
    assert lr_factor(10**6, ScheduleConfig(shape="constant", warmup_tokens=20)) == 1.0


def test_the_schedule_is_in_tokens_not_steps():
    cfg = ScheduleConfig(shape="linear", warmup_tokens=0, decay_tokens=1000, min_lr_ratio=0.0)
    # 10 steps of 50 tokens and 5 steps of 100 tokens reach the same learning rate.
    assert lr_factor(10 * 50, cfg) == lr_factor(5 * 100, cfg) == pytest.approx(0.5)


def test_each_group_follows_its_own_peak_and_warmup():
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    optimizer = torch.optim.AdamW(
        [
            {"params": [params[0]], "name": "a", "peak_lr": 1e-3, "warmup_tokens": 0},
            {"params": [params[1]], "name": "b", "peak_lr": 1e-4, "warmup_tokens": 200},
        ]
    )
    cfg = ScheduleConfig(shape="constant", warmup_tokens=0)
    assert apply_schedule(optimizer, 100, cfg) == {"a": 1e-3, "b": pytest.approx(5e-5)}
    assert optimizer.param_groups[1]["lr"] == pytest.approx(5e-5)


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="shape"):
        ScheduleConfig(shape="step")
    with pytest.raises(ValueError, match="min_lr_ratio"):
        ScheduleConfig(min_lr_ratio=2.0)
