"""Derived values: steps, warmup, global batch."""

from launcher.recipe.resolve import schedule
from launcher.recipe.schema import TrainCfg


def test_quickstart_schedule_matches_trainer():
    s = schedule(TrainCfg(micro_batch_size=16, epochs=1, warmup_ratio=0.1), 1780)
    assert (s.steps_per_epoch, s.total_steps, s.warmup_steps, s.global_batch) == (112, 112, 12, 16)


def test_grad_accum_world_size_and_partial_groups():
    s = schedule(TrainCfg(micro_batch_size=4, grad_accum=3, epochs=2), 100, world_size=2)
    assert s.micro_batches_per_epoch == 13 and s.steps_per_epoch == 5 and s.total_steps == 10
    assert s.global_batch == 24


def test_max_steps_wins_and_warmup_steps_cap():
    s = schedule(TrainCfg(max_steps=7, warmup_steps=50), 1000)
    assert s.total_steps == 7 and s.warmup_steps == 7


def test_fractional_epochs():
    assert schedule(TrainCfg(micro_batch_size=10, epochs=0.5), 100).total_steps == 5
