"""The one training loop for every method: prerequisites first, state on the mesh, one jitted step, logs,
checkpoints, resume."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from semiseg import checkpoint, fileio, monitor, restore, sharding, tensorboard
from semiseg.data import pipeline
from semiseg.methods import base, prerequisites
from semiseg.run import Run, method_batch_sizes, resolve

log = logging.getLogger(__name__)

SAMPLING = {'unlabeled': 'epoch', 'labeled': 'replacement'}
STREAM_SEED_OFFSET = {'unlabeled': 0, 'labeled': 1}  # independent orders for the two streams


@dataclasses.dataclass(frozen=True)
class TrainResult:
  run: Run  # the run, with its trained state
  resumed_from: int | None  # checkpoint step this run started from, None when from scratch
  loop_timing: LoopTiming | None = None  # when this run ran train steps

  # The run's parts, read through.
  method = property(lambda self: self.run.method)
  state = property(lambda self: self.run.state)
  data = property(lambda self: self.run.data)
  ctx = property(lambda self: self.run.ctx)
  mesh = property(lambda self: self.run.mesh)


@dataclasses.dataclass(frozen=True)
class LoopTiming:
  """Wall time of the loop's steps after its first (compiling) one, logs and checkpoints included
  (``experiments.benchmark --what=loop`` sets it against the bare jitted step)."""
  steps: int
  seconds: float
  images_per_step: int
  compile_s: float

  @property
  def images_per_s(self) -> float:
    return self.steps * self.images_per_step / self.seconds if self.seconds > 0 else float('nan')


def _initial_state(run: Run, ckpt: checkpoint.Checkpointer):
  restored = restore.restore_state(run, ckpt)
  if restored is not None:
    state, meta, step = restored
    ckpt.set_aside_failed()  # unreadable newer steps would block saving those steps again
    return state, step
  state = sharding.create_sharded_state(run.method.init, jax.random.PRNGKey(run.config.seed), run.mesh)
  if run.method.extras is not None:
    state = state.replace(extras=jax.device_put(run.method.extras, sharding.replicated(run.mesh)))
  return state, None


def _check_finite(track: dict, step: int) -> None:
  """Raises when a step up to ``step`` had a non-finite metric (``track`` from ``_tracked_step``, on the host)."""
  bad_step = int(track['bad_step'])
  if bad_step < 0:
    return
  metrics = {k: float(v) for k, v in track['bad_metrics'].items()}
  bad = [k for k, v in metrics.items() if not np.isfinite(v)]
  seen = '' if bad_step == step else f', seen at step {step}'
  raise FloatingPointError(f'Non-finite {", ".join(bad)} at step {bad_step} '
                           f'({", ".join(f"{k}={metrics[k]}" for k in bad)}){seen}; the last good checkpoint '
                           'is kept. Lower config.optim.learning_rate or check the data.')


def _tracked_step(train_step, state, batch, track, reset):
  """``train_step``, and ``track`` updated on the device: the first step with a non-finite metric and its
  metrics (``bad_step`` -1: none yet), and the sum and count of every metric since the last record
  (``reset``: this step starts a new interval). Metrics then reach the host only at log and checkpoint
  steps, as their mean over the interval, and the run still stops at the first of them after a
  non-finite loss."""
  new_state, metrics = train_step(state, batch)
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(metrics)]))
  first = (track['bad_step'] < 0) & ~finite
  return new_state, {
      'bad_step': jnp.where(first, new_state.step, track['bad_step']).astype(jnp.int32),
      'bad_metrics': jax.tree.map(lambda old, new: jnp.where(first, new, old), track['bad_metrics'], metrics),
      'sums': jax.tree.map(lambda old, new: jnp.where(reset, 0.0, old) + new.astype(jnp.float32), track['sums'],
                           metrics),
      'count': jnp.where(reset, 0, track['count']) + 1}


def _batches(method: base.Method, config, data, start_step: int, mesh):
  """Global batches for each step from ``start_step``: ``{'labeled': {...}, 'unlabeled': {...}}``."""
  sizes = method_batch_sizes(config, method)
  # One thread gathers each stream's rows and puts the batch on the devices, config.data.prefetch steps
  # ahead: the loop's next() only takes a placed batch, and the copy overlaps the step in flight.
  iters = {s: pipeline.batch_stream(_with_fields(method, getattr(data, s), s), batch_size=sizes[s],
                                    seed=config.seed * 7919 + STREAM_SEED_OFFSET[s], start_step=start_step,
                                    sampling=SAMPLING[s], process_index=jax.process_index(),
                                    process_count=jax.process_count(), prefetch=0)
           for s in method.streams}
  return pipeline.prefetched(lambda _: sharding.to_global({s: next(it) for s, it in iters.items()}, mesh),
                             start_step, config.data.prefetch)


def _with_fields(method: base.Method, split: pipeline.Split, stream: str) -> pipeline.Split:
  """The split with the arrays the method computes once from its images (``Method.stream_fields``)."""
  fns = (method.stream_fields or {}).get(stream, {})
  if not fns:
    return split
  return dataclasses.replace(split, fields={**split.fields, **{name: fn(split.images) for name, fn in fns.items()}})


def train(config, workdir: str, mesh=None, data=None, progress: bool = True) -> TrainResult:
  """Trains ``config.method`` in ``workdir``, resuming from its latest checkpoint."""
  # One lock per run: process 0 holds it (the others share its workdir, often on the same host).
  with fileio.workdir_lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
    return _train_locked(config, workdir, mesh, data, progress)


def train_prerequisites(config, workdir: str, mesh, data) -> dict[str, tuple[base.TrainState, str]]:
  """Each prerequisite ``config.method`` declares, finished, with its workdir: restored from the workdir
  its config key names (never trained there), else trained, or resumed, in ``<workdir>/<name>`` on the
  same data. ``run.resolve``'s resolver for a run the loop trains."""
  trained = {}
  for name, req in prerequisites(config).items():
    given = config.get(req.workdir_key)
    wd = given or os.path.join(workdir, name)
    if given:
      state = restore.restore_prerequisite(
          config, name, req, given, mesh, data,
          hint=f' or unset config.{req.workdir_key} to train one inside this run\'s workdir')
    else:
      state = train(req.config, wd, mesh=mesh, data=data).state
    check_health(config, name, req, wd)
    trained[name] = (state, wd)
  return trained


def check_health(config, name: str, req: base.Prerequisite, workdir: str) -> None:
  """Refuses to build on a prerequisite whose training collapsed (its health.json), unless allowed."""
  h = monitor.read_health(workdir)
  if not h or not h.get('collapsed'):
    return
  why = '; '.join(h.get('warnings', []))
  if req.allow_collapsed_key and config.get(req.allow_collapsed_key):
    log.warning('%s builds on the collapsed %s in %s (%s), as config.%s allows.', config.method, name, workdir,
                why, req.allow_collapsed_key)
    return
  raise RuntimeError(f'The {name} in {workdir} collapsed in training ({why}), so {config.method} would learn '
                     f'from a useless input. Retrain it (e.g. lower config.ae_learning_rate or train longer) '
                     f'or set config.{req.allow_collapsed_key}=True to use it anyway.')


def _train_locked(config, workdir, mesh, data, progress) -> TrainResult:
  run = resolve(config, workdir, train_prerequisites, mesh, data)
  config, method, total = run.config, run.method, run.num_train_steps
  if jax.process_index() == 0:
    fileio.write_json_atomic(os.path.join(workdir, 'run_info.json'), fileio.run_info(config))
  ckpt = checkpoint.Checkpointer(workdir, config.ckpt.every_steps, config.ckpt.keep)
  try:
    state, resumed = _initial_state(run, ckpt)
    step = int(jax.device_get(state.step))
    if resumed is not None:
      log.info('Resumed %s from step %d in %s', config.method, step, ckpt.directory)

    if method.train_step is None:  # closed-form method: solved once from the unlabeled images
      if step == 0:
        images = sharding.from_full_array(run.data.unlabeled.images, run.mesh)  # any count, any process count
        state = jax.jit(method.solve)(state, images)
        step = int(jax.device_get(state.step))
        ckpt.save(step, state, run.checkpoint_meta(step, True, total=step), force=True)
      ckpt.wait()
      return TrainResult(run.with_state(state), resumed)

    if step > total:
      raise ValueError(f'{ckpt.directory} holds a checkpoint at step {step}, past this config\'s '
                       f'{total} training steps: it was trained longer than asked. Use another --workdir '
                       f'or set config.num_train_steps={step}.')
    loop_timing = None
    if step < total:
      state, loop_timing = _loop(run, ckpt, state, step, progress)
    elif ckpt.latest_step() is None:  # zero steps asked for: still leave a checkpoint
      ckpt.save(step, state, run.checkpoint_meta(step, True), force=True)
    ckpt.wait()
    if jax.process_index() == 0 and method.monitor is not None:
      monitor.write_health(workdir, method.monitor)
    return TrainResult(run.with_state(state), resumed, loop_timing)
  finally:
    ckpt.close()


def _watch(watcher, state) -> dict:
  """The monitor's values at a log step."""
  return {k: (v if np.isfinite(v) else None) for k, v in watcher(state).items()}  # strict JSON: null, not NaN


def _loop(run: Run, ckpt, state, step, progress):
  """Runs steps ``step + 1 .. total`` and keeps the device busy: the host does not wait for a step
  between log steps (metrics stay on the device, ``_tracked_step`` watches them for non-finite
  values), the next batch goes to the device while the current step runs, and a checkpoint's digest
  is reduced on the device (``checkpoint.device_digest``)."""
  method, config, mesh, total = run.method, run.config, run.mesh, run.num_train_steps
  state_sharding = jax.tree.map(lambda _: sharding.replicated(mesh), state)
  replicated = sharding.replicated(mesh)
  jit_step = jax.jit(functools.partial(_tracked_step, method.train_step),
                     out_shardings=(state_sharding, replicated), donate_argnums=0)
  is_main = jax.process_index() == 0
  metrics_path = os.path.join(run.workdir, 'metrics.jsonl')
  batches = _batches(method, config, run.data, step, mesh)
  images_per_step = run.images_per_step
  bar = tqdm(total=total, initial=step, desc=f'{config.method}', disable=not (progress and is_main),
             dynamic_ncols=True, leave=False, mininterval=2.0)
  # (step, monitor values, track) of a log step: pulled one step late so dispatch stays asynchronous
  pending = None
  t_last, n_last = time.perf_counter(), step
  compile_s, t_first, first_step = None, None, step + 1
  # The monitor watches the labeled images: none in zero-label mode (config.data.k_labeled=0), nothing to watch.
  watcher = (monitor.Monitor(method, run.ctx, mesh, run.data.labeled, float(config.threshold))
             if method.monitor is not None and len(run.data.labeled) else None)
  batch = next(batches)
  _, abstract_metrics = jax.eval_shape(method.train_step, state, batch)
  checkpoint.compile_digest(state)  # now, not at the first save
  track = jax.device_put({'bad_step': np.int32(-1),
                          'bad_metrics': jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract_metrics),
                          'sums': jax.tree.map(lambda a: np.zeros(a.shape, np.float32), abstract_metrics),
                          'count': np.int32(0)}, replicated)
  reset = True  # the step after a record starts a new interval of the metrics' means
  flags = {b: jax.device_put(np.bool_(b), replicated) for b in (False, True)}  # no host copy per step
  try:
    while step < total:
      t0 = time.perf_counter()
      state, track = jit_step(state, batch, track, flags[reset])
      step += 1
      if step < total:
        batch = next(batches)  # its host-to-device copy overlaps the step just dispatched
      if compile_s is None:
        jax.block_until_ready(track)
        t_first = time.perf_counter()
        compile_s = t_first - t0
      if pending is not None:
        _flush(pending, config, metrics_path, is_main, bar, t_last, n_last, images_per_step)
        t_last, n_last = time.perf_counter(), pending[0]
        pending = None
      log_step = step % config.log_every_steps == 0
      watched = _watch(watcher, state) if watcher is not None and (log_step or step == total) else {}
      reset = False
      if ckpt.should_save(step) or step == total:  # checked before it is saved: no non-finite checkpoint
        _flush((step, watched, track), config, metrics_path, is_main, bar, t_last, n_last,
               images_per_step, force_log=True)
        ckpt.save(step, state, run.checkpoint_meta(step, step == total), force=True)
        reset = True
      elif log_step:
        pending = (step, watched, track)
        reset = True
      bar.update(1)
    jax.block_until_ready(state)
    t_end = time.perf_counter()
  finally:
    bar.close()
  if is_main:
    log.info('%s: %d steps done; first step (compile) %.1f s', config.method, total, compile_s or 0.0)
  return state, LoopTiming(steps=total - first_step, seconds=t_end - t_first, images_per_step=images_per_step,
                           compile_s=compile_s)


def _flush(pending, config, metrics_path, is_main, bar, t_last, n_last, images_per_step, force_log=False):
  step, watched, track = pending
  track = jax.device_get(track)
  _check_finite(track, step)
  # Each metric's mean over the steps since the previous record: one step's loss of a few labeled
  # images jumps by 10x from batch to batch, the interval's mean is the curve.
  values = {k: float(v) / max(int(track['count']), 1) for k, v in track['sums'].items()}
  values.update(watched)  # monitor values: NaN is a valid answer (e.g. no defect pixel), not a failure
  if step % config.log_every_steps == 0 or force_log:
    now = time.perf_counter()
    rate = (step - n_last) * images_per_step / max(now - t_last, 1e-9) if step > n_last else float('nan')
    bar.set_postfix(loss=f'{values.get("loss", float("nan")):.4f}', img_s=f'{rate:.1f}')
    if is_main:
      record = {'step': step, **values, 'images_per_s': rate, 'time': time.time()}
      with open(metrics_path, 'a') as f:
        f.write(fileio.to_json(record) + '\n')  # strict JSON: NaN (e.g. no rate yet) as null
      tensorboard.write_scalars(os.path.dirname(metrics_path), record)  # <workdir>/tb, if tensorboardX
