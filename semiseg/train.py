"""The one training loop for every method: state on the mesh, one jitted step, logs, checkpoints, resume."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from typing import Any

import jax
import numpy as np
from ml_collections import config_dict
from tqdm.auto import tqdm

from semiseg import checkpoint, io, sharding
from semiseg.data import pipeline
from semiseg.methods import base, create_method, validate_method

log = logging.getLogger(__name__)

SAMPLING = {'unlabeled': 'epoch', 'labeled': 'replacement'}
STREAM_SEED_OFFSET = {'unlabeled': 0, 'labeled': 1}  # independent orders for the two streams


@dataclasses.dataclass
class TrainResult:
  method: base.Method
  state: base.TrainState
  data: pipeline.CategoryData
  ctx: base.MethodContext
  mesh: Any
  num_train_steps: int
  resumed_from: int | None  # checkpoint step this run started from, None when from scratch


def ae_config_for(config: config_dict.ConfigDict) -> config_dict.ConfigDict:
  """The config of the AE that ``ae_unet`` (and the reproduce runs) reuse: same data and seed."""
  ae = config_dict.ConfigDict(config.to_dict(), type_safe=False)
  ae.method = 'ae'
  if config.get('ae_num_train_steps'):
    ae.num_train_steps = config.ae_num_train_steps
  if config.get('ae_batch_size'):
    ae.batch_size = config.ae_batch_size
  return ae


def stream_batch_sizes(config, streams: tuple[str, ...]) -> dict[str, int]:
  """The primary stream gets ``batch_size``; an unlabeled secondary stream ``unlabeled_batch_size``."""
  sizes = {streams[0]: config.batch_size}
  for s in streams[1:]:
    sizes[s] = config.unlabeled_batch_size
  return sizes


def schedule(config, num_unlabeled: int) -> tuple[int, int]:
  """(steps_per_epoch, num_train_steps).

  An epoch is one pass's worth of the category's unlabeled training images at ``batch_size``, for
  every method: with 2-9 labeled images a pass over the labeled set would be a single step, and the
  paper's "decay every 30 epochs" would then decay every 30 steps. So all methods of a category train
  for the same number of steps and decay on the same schedule.
  """
  steps_per_epoch = config.steps_per_epoch or max(1, math.ceil(num_unlabeled / config.batch_size))
  total = config.num_train_steps if config.num_train_steps is not None else config.num_epochs * steps_per_epoch
  if steps_per_epoch <= 0:
    raise ValueError(f'config.steps_per_epoch must be positive, got {steps_per_epoch}.')
  if total < 0:
    raise ValueError(f'config.num_train_steps must be >= 0, got {total}.')
  return steps_per_epoch, total


def validate_config(config) -> None:
  """Values that cannot work, reported with the key and the fix before anything is built."""
  if config.batch_size <= 0:
    raise ValueError(f'config.batch_size must be positive, got {config.batch_size}.')
  if config.unlabeled_batch_size <= 0:
    raise ValueError(f'config.unlabeled_batch_size must be positive, got {config.unlabeled_batch_size}.')
  if config.eval_batch_size <= 0:
    raise ValueError(f'config.eval_batch_size must be positive, got {config.eval_batch_size}.')
  if config.log_every_steps <= 0:
    raise ValueError(f'config.log_every_steps must be positive, got {config.log_every_steps}.')
  if config.data.k_labeled < 1:
    raise ValueError(f'config.data.k_labeled must be at least 1, got {config.data.k_labeled}.')
  if config.data.split not in ('paper', 'k_per_defect'):
    raise ValueError(f"config.data.split must be 'paper' or 'k_per_defect', got {config.data.split!r}.")
  if config.data.test_to_unlabeled < 0:
    raise ValueError(f'config.data.test_to_unlabeled must be >= 0, got {config.data.test_to_unlabeled}.')
  if config.data.image_size <= 0:
    raise ValueError(f'config.data.image_size must be positive, got {config.data.image_size}.')
  validate_method(config)  # the method's own checks, before anything (an AE, say) is trained


def build(config, workdir: str | None, mesh=None, data: pipeline.CategoryData | None = None):
  """Data, method and schedule for a config, without touching checkpoints."""
  validate_config(config)
  mesh = mesh or sharding.create_mesh()
  if data is None:  # process 0 prepares the dataset and writes split.json; the others then read them
    data = sharding.main_process_first(lambda: pipeline.load_category(config.data, workdir),
                                       'semiseg.load_category')
  steps_per_epoch, total = schedule(config, len(data.unlabeled))
  ctx = base.MethodContext(image_size=config.data.image_size, texture=data.texture,
                           steps_per_epoch=steps_per_epoch, workdir=workdir, data=data)
  method = create_method(config, ctx)
  for stream, size in stream_batch_sizes(config, method.streams).items():
    key = 'config.batch_size' if stream == method.streams[0] else 'config.unlabeled_batch_size'
    sharding.check_batch_size(size, mesh, key)
    if len(getattr(data, stream)) == 0:
      raise ValueError(f'The {stream} split of {config.data.name}/{config.data.category} is empty; '
                       f'{config.method} needs {stream} images.')
  return method, data, ctx, mesh, total


def _meta(config, step: int, total: int, done: bool) -> dict:
  return {'step': int(step), 'num_train_steps': int(total), 'done': bool(done), 'method': config.method,
          'dataset': config.data.name, 'category': config.data.category,
          'image_size': int(config.data.image_size), 'seed': int(config.seed)}


def _initial_state(method: base.Method, config, ckpt: checkpoint.Checkpointer, mesh):
  key = jax.random.PRNGKey(config.seed)
  restored = ckpt.restore(sharding.abstract_state(method.init, key, mesh),
                          check_meta=lambda meta: _check_meta(meta, config, ckpt.directory))
  if restored is not None:
    state, meta, step = restored
    ckpt.set_aside_failed()  # unreadable newer steps would block saving those steps again
    return state, step
  state = sharding.create_sharded_state(method.init, key, mesh)
  if method.extras is not None:
    state = state.replace(extras=jax.device_put(method.extras, sharding.replicated(mesh)))
  return state, None


def _check_meta(meta: dict, config, where: str) -> None:
  for key, name, value in (('method', 'config.method', config.method),
                           ('image_size', 'config.data.image_size', config.data.image_size),
                           ('category', 'config.data.category', config.data.category)):
    if key in meta and meta[key] != value:
      raise ValueError(f'The checkpoint in {where} was made with {key}={meta[key]!r} but the config asks '
                       f'for {name}={value!r}: use another --workdir (or config.ae_workdir for the AE of '
                       f'ae_unet) or set {name}={meta[key]!r}.')


def _check_finite(metrics: dict, step: int) -> None:
  bad = [k for k, v in metrics.items() if not np.all(np.isfinite(v))]
  if bad:
    raise FloatingPointError(f'Non-finite {", ".join(bad)} at step {step} '
                             f'({", ".join(f"{k}={metrics[k]}" for k in bad)}); the last good checkpoint '
                             'is kept. Lower config.optim.learning_rate or check the data.')


def _batches(method: base.Method, config, data, start_step: int, mesh):
  """Global batches for each step from ``start_step``: ``{'labeled': {...}, 'unlabeled': {...}}``."""
  sizes = stream_batch_sizes(config, method.streams)
  iters = {s: pipeline.batch_stream(getattr(data, s), batch_size=sizes[s],
                                    seed=config.seed * 7919 + STREAM_SEED_OFFSET[s], start_step=start_step,
                                    sampling=SAMPLING[s], process_index=jax.process_index(),
                                    process_count=jax.process_count(), prefetch=config.data.prefetch)
           for s in method.streams}
  while True:
    local = {s: next(it) for s, it in iters.items()}
    yield sharding.to_global(local, mesh)


def train(config, workdir: str, mesh=None, data=None, progress: bool = True) -> TrainResult:
  """Trains ``config.method`` in ``workdir``, resuming from its latest checkpoint."""
  # One lock per run: process 0 holds it (the others share its workdir, often on the same host).
  with io.workdir_lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
    return _train_locked(config, workdir, mesh, data, progress)


def _train_locked(config, workdir, mesh, data, progress) -> TrainResult:
  method, data, ctx, mesh, total = build(config, workdir, mesh, data)
  if jax.process_index() == 0:
    io.write_json_atomic(os.path.join(workdir, 'run_info.json'), io.run_info(config))
  ckpt = checkpoint.Checkpointer(workdir, config.ckpt.every_steps, config.ckpt.keep)
  try:
    state, resumed = _initial_state(method, config, ckpt, mesh)
    step = int(jax.device_get(state.step))
    if resumed is not None:
      log.info('Resumed %s from step %d in %s', config.method, step, ckpt.directory)

    if method.train_step is None:  # closed-form method: one fit over the unlabeled images
      if step == 0:
        images = sharding.from_full_array(data.unlabeled.images, mesh)  # any count, any process count
        state = jax.jit(method.fit)(state, images)
        step = int(jax.device_get(state.step))
        ckpt.save(step, state, _meta(config, step, step, True), force=True)
      ckpt.wait()
      return TrainResult(method, state, data, ctx, mesh, step, resumed)

    if step > total:
      raise ValueError(f'{ckpt.directory} holds a checkpoint at step {step}, past this config\'s '
                       f'{total} training steps: it was trained longer than asked. Use another --workdir '
                       f'or set config.num_train_steps={step}.')
    if step < total:
      state = _loop(method, config, workdir, ckpt, mesh, data, state, step, total, progress)
    elif ckpt.latest_step() is None:  # zero steps asked for: still leave a checkpoint
      ckpt.save(step, state, _meta(config, step, total, True), force=True)
    ckpt.wait()
    return TrainResult(method, state, data, ctx, mesh, total, resumed)
  finally:
    ckpt.close()


def _loop(method, config, workdir, ckpt, mesh, data, state, step, total, progress):
  state_sharding = jax.tree.map(lambda _: sharding.replicated(mesh), state)
  jit_step = jax.jit(method.train_step, out_shardings=(state_sharding, sharding.replicated(mesh)),
                     donate_argnums=0)
  is_main = jax.process_index() == 0
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  batches = _batches(method, config, data, step, mesh)
  images_per_step = sum(stream_batch_sizes(config, method.streams).values())
  bar = tqdm(total=total, initial=step, desc=f'{config.method}', disable=not (progress and is_main),
             dynamic_ncols=True, leave=False, mininterval=2.0)
  pending = None  # (step, metrics): pulled one step late so dispatch stays asynchronous
  t_last, n_last = time.perf_counter(), step
  compile_s = None
  try:
    while step < total:
      t0 = time.perf_counter()
      state, metrics = jit_step(state, next(batches))
      if compile_s is None:
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - t0
      step += 1
      if pending is not None:
        _flush(pending, config, metrics_path, is_main, bar, t_last, n_last, images_per_step)
        if pending[0] % config.log_every_steps == 0:
          t_last, n_last = time.perf_counter(), pending[0]
      pending = (step, metrics)
      if ckpt.should_save(step) or step == total:
        _flush(pending, config, metrics_path, is_main, bar, t_last, n_last, images_per_step, force_log=True)
        pending = None
        ckpt.save(step, state, _meta(config, step, total, step == total), force=True)
      bar.update(1)
  finally:
    bar.close()
  if is_main:
    log.info('%s: %d steps done; first step (compile) %.1f s', config.method, total, compile_s or 0.0)
  return state


def _flush(pending, config, metrics_path, is_main, bar, t_last, n_last, images_per_step, force_log=False):
  step, metrics = pending
  values = {k: float(v) for k, v in jax.device_get(metrics).items()}
  _check_finite(values, step)
  if step % config.log_every_steps == 0 or force_log:
    now = time.perf_counter()
    rate = (step - n_last) * images_per_step / max(now - t_last, 1e-9) if step > n_last else float('nan')
    bar.set_postfix(loss=f'{values.get("loss", float("nan")):.4f}', img_s=f'{rate:.1f}')
    if is_main:
      record = {'step': step, **values, 'images_per_s': rate, 'time': time.time()}
      with open(metrics_path, 'a') as f:
        f.write(json.dumps(record) + '\n')


def ensure_trained(config, workdir: str, train_if_missing: bool = True, mesh=None,
                   data=None) -> base.TrainState:
  """The finished state of ``config.method`` in ``workdir``; trains (or finishes) it when allowed."""
  ckpt_dir = os.path.join(workdir, 'ckpt')
  if not train_if_missing:
    if not os.path.isdir(ckpt_dir) or not checkpoint.Checkpointer(workdir, 1, 1).all_steps():
      raise FileNotFoundError(f'No checkpoint in {ckpt_dir}: train the autoencoder there first '
                              f'(python -m experiments.train --config ... --config.method=ae --workdir {workdir}) '
                              'or unset config.ae_workdir to train one inside this run\'s workdir.')
  if train_if_missing:
    return train(config, workdir, mesh=mesh, data=data).state
  return restore_trained(config, workdir, mesh, data)[1]


def restore_trained(config, workdir: str, mesh=None, data=None):
  """(method, state, data, ctx, mesh) from a finished workdir, for evaluation and prediction."""
  method, data, ctx, mesh, total = build(config, workdir, mesh, data)
  ckpt = checkpoint.Checkpointer(workdir, config.ckpt.every_steps, config.ckpt.keep)
  try:
    restored = ckpt.restore(sharding.abstract_state(method.init, jax.random.PRNGKey(config.seed), mesh),
                            check_meta=lambda meta: _check_meta(meta, config, ckpt.directory))
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(f'No checkpoint in {os.path.join(workdir, "ckpt")}: train first with '
                            f'python -m experiments.train --workdir {workdir}.')
  state, meta, _ = restored
  _check_meta(meta, config, workdir)
  if meta.get('image_size') not in (None, config.data.image_size):
    raise ValueError(f'{workdir} was trained at image_size={meta["image_size"]} but '
                     f'config.data.image_size={config.data.image_size}.')
  if not meta.get('done', True):
    log.warning('%s: checkpoint at step %s of %s (training not finished).', workdir, meta.get('step'),
                meta.get('num_train_steps'))
  return method, state, data, ctx, mesh
