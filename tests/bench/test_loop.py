"""The loop benchmark's config: one checkpoint interval by default, at least 2 steps."""

import pytest


def test_the_loop_benchmark_ends_on_a_checkpoint_interval(setting):
  """By default the loop runs one checkpoint interval, so its only save is its end's (as a run of the config
  saves every interval), not an interval's save followed at once by the end's."""
  from semiseg.bench import loop
  every = setting.config.ckpt.every_steps
  assert loop.loop_config(setting, 'unet', None).num_train_steps == every
  assert loop.loop_config(setting, 'unet', 3 * every).num_train_steps == 3 * every
  with pytest.raises(ValueError, match='at least 2 steps'):
    loop.loop_config(setting, 'unet', 1)
