"""The training loop against its own step: ``semiseg.train``'s images/s over N steps (input pipeline,
logs, non-finite checks, checkpoints included) vs the bare jitted step on the same batches, already on
the device, back to back. ``ratio`` = loop / step: what the loop costs beyond the step's math."""

from __future__ import annotations

import copy
import logging
import statistics
import tempfile
import time

import jax
import numpy as np

from semiseg import restore, sharding, train
from semiseg.bench.suite import Record, Setting, device_name
from semiseg.data import pipeline
from semiseg.run import resolve


def _in_memory_data(config, n: int = 64, seed: int = 0) -> pipeline.CategoryData:
  """Random images and masks of the config's size, in memory (no dataset to build)."""
  rng = np.random.default_rng(seed)
  s = config.data.image_size

  def split(k: int) -> pipeline.Split:
    return pipeline.Split(images=rng.integers(0, 256, (k, s, s, 3), np.uint8),
                          masks=(rng.random((k, s, s, 1)) > 0.9).astype(np.uint8),
                          defect_types=['good'] * k, filenames=[f'{i}.png' for i in range(k)])
  return pipeline.CategoryData(unlabeled=split(n), labeled=split(n), test=split(8), manifest={}, texture=False,
                               image_size=s)


def loop_config(setting: Setting, method: str, steps: int | None):
  """The setting's config training ``method`` for ``steps`` steps (default ``config.ckpt.every_steps``), the
  first of which compiles and is not timed. The run then saves as a run of that config does: every
  interval, the last one at its end. (With one step more, the end's save would follow the interval's
  at once and wait for its write: 150-330 ms of a 5 s window on a 2-core CPU.) Its log and checkpoint
  intervals are the setting's own."""
  config = copy.deepcopy(setting.config)
  config.method = method
  config.num_train_steps = steps or config.ckpt.every_steps
  if config.num_train_steps < 2:
    raise ValueError(f'the loop benchmark needs at least 2 steps (the first compiles), got {config.num_train_steps}.')
  return config


def time_loop(config, data: pipeline.CategoryData) -> train.LoopTiming:
  """One run of the loop in a fresh workdir: its timing after the first (compiling) step."""
  with tempfile.TemporaryDirectory(prefix='semiseg_loop_') as workdir:
    return train.train(config, workdir, data=data, progress=False).loop_timing


def time_bare_step(config, data: pipeline.CategoryData) -> tuple[float, int, int]:
  """(seconds, steps, images per step) of the jitted train step alone on the loop's batches (placed on the device
  beforehand), after a first compiling step: the steps the loop times, back to back."""
  run = resolve(config, None, restore.restore_prerequisites, data=data)
  method, data, mesh, total = run.method, run.data, run.mesh, run.num_train_steps
  state = sharding.create_sharded_state(method.init, jax.random.PRNGKey(config.seed), mesh)
  batches = train._batches(method, config, data, 0, mesh)  # noqa: SLF001 - the loop's own batches
  batches = [next(batches) for _ in range(total)]
  jax.block_until_ready(batches)
  step = jax.jit(method.train_step, donate_argnums=0)
  state, metrics = step(state, batches[0])
  jax.block_until_ready((state, metrics))
  start = time.perf_counter()
  for batch in batches[1:]:
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  seconds = time.perf_counter() - start
  return seconds, total - 1, run.images_per_step


def bench_loop(setting: Setting, method: str = 'unet', steps: int | None = None, repeats: int = 3) -> list[Record]:
  """Images/s of ``train.train``'s loop over ``steps`` steps vs the bare jitted step on the same batches,
  alternating (step, loop, step, loop, ...), median of ``repeats``, after one untimed loop run: a
  process pays once for its first checkpoint save (Orbax's and TensorStore's set-up) and its first
  writers, which a run does not pay again every ``steps`` steps (on a 2-core CPU the first loop of a
  process ran at 0.71-0.77 of its bare step's rate, the later ones at 0.95-1.10)."""
  config = loop_config(setting, method, steps)
  data = _in_memory_data(config)
  loop_rates, step_rates, timing = [], [], None
  logging.getLogger('semiseg.train').setLevel(logging.WARNING)  # one info line per run otherwise
  time_loop(config, data)  # the untimed warm-up run
  for _ in range(max(1, repeats)):
    seconds, n, images_per_step = time_bare_step(config, data)
    step_rates.append(n * images_per_step / seconds)
    timing = time_loop(config, data)
    loop_rates.append(timing.images_per_s)
  loop, step = statistics.median(loop_rates), statistics.median(step_rates)
  return [Record(workload='loop', semiseg_per_s=loop, reference_per_s=step, unit='images/s',
                 device=device_name(), shapes=setting.shapes, batch_size=config.batch_size,
                 reference=f'the bare jitted {method} train step on the same batches, on the device',
                 compile_s=timing.compile_s,
                 note=(f'{method}, {timing.steps} steps after the first, log every {config.log_every_steps}, '
                       f'checkpoint every {config.ckpt.every_steps} and at the end; median of {len(loop_rates)} '
                       f'after an untimed loop run; '
                       f'loop {", ".join(f"{r:.1f}" for r in loop_rates)} vs step '
                       f'{", ".join(f"{r:.1f}" for r in step_rates)} images/s'))]

