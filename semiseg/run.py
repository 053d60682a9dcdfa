"""A training run's config resolved once into a typed record: category rules, checks, schedule, batch sizes,
data, prerequisites, method, and the meta its checkpoints carry.

``resolve`` builds a run and touches none of its own checkpoints; the loop (semiseg/train.py) hands it a
resolver that trains missing prerequisites, restoring (semiseg/restore.py) one that only restores them.
The loop, evaluation and restore then read the record's fields, not the config's keys.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable

from semiseg import sharding
from semiseg.data import categories, pipeline
from semiseg.methods import base, create_method, validate_method

# (config, workdir, mesh, data) -> {name: (finished TrainState, its workdir)} of config.method's prerequisites.
PrerequisiteResolver = Callable[..., dict[str, tuple[base.TrainState, str]]]


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of ``config.method`` on one category, resolved from its config.

  Attributes:
    config: the config with its category's rules applied (texture, border, flips); what run_info.json
      records and what the method was created from.
    workdir: where the run's checkpoints, logs and split.json live; None for a run that keeps none.
    mesh: the data-parallel mesh.
    data: the category's splits (split.json's manifest).
    ctx: what the method was created with (sizes, texture, schedule, the training images).
    method: the method, created with its prerequisites trained.
    steps_per_epoch, num_train_steps: the schedule (``schedule``).
    batch_sizes: global batch size of each stream of ``method.streams``, primary first.
    prerequisite_workdirs: where each prerequisite (ae_unet's 'ae') was trained.
    state: the trained or restored TrainState; None until then (``with_state``).
  """
  config: Any
  workdir: str | None
  mesh: Any
  data: pipeline.CategoryData
  ctx: base.MethodContext
  method: base.Method
  steps_per_epoch: int
  num_train_steps: int
  batch_sizes: dict[str, int]
  prerequisite_workdirs: dict[str, str] = dataclasses.field(default_factory=dict)
  state: base.TrainState | None = None

  @property
  def images_per_step(self) -> int:
    return sum(self.batch_sizes.values())

  @property
  def metrics_files(self) -> dict[str, str]:
    """{name: metrics.jsonl} of the prerequisites, then of the run itself (``config.method``)."""
    out = {name: os.path.join(wd, 'metrics.jsonl') for name, wd in self.prerequisite_workdirs.items()}
    if self.workdir is not None:
      out[self.config.method] = os.path.join(self.workdir, 'metrics.jsonl')
    return out

  def with_state(self, state: base.TrainState) -> Run:
    return dataclasses.replace(self, state=state)

  def checkpoint_meta(self, step: int, done: bool, total: int | None = None) -> dict:
    """What a checkpoint records beside the state: progress and what it was trained for."""
    c = self.config
    return {'step': int(step), 'num_train_steps': int(self.num_train_steps if total is None else total),
            'done': bool(done), 'method': c.method, 'dataset': c.data.name, 'category': c.data.category,
            'image_size': int(c.data.image_size), 'seed': int(c.seed)}

  def check_meta(self, meta: dict, where: str) -> None:
    """A checkpoint made for another method, image size or category is refused, naming the fix."""
    check_meta(meta, self.config, where)


def check_meta(meta: dict, config, where: str) -> None:
  for key, name, value in (('method', 'config.method', config.method),
                           ('image_size', 'config.data.image_size', config.data.image_size),
                           ('category', 'config.data.category', config.data.category)):
    if key in meta and meta[key] != value:
      raise ValueError(f'The checkpoint in {where} was made with {key}={meta[key]!r} but the config asks '
                       f'for {name}={value!r}: use another --workdir (or the config key naming a '
                       f'prerequisite\'s workdir, e.g. config.ae_workdir) or set {name}={meta[key]!r}.')


def _own(config, key: str):
  """``config.<method>.<key>`` when the method's own config group sets it (e.g. ``anogan``), else None."""
  group = config.get(config.method)
  return group.get(key) if hasattr(group, 'get') else None


def primary_batch_key(config) -> str:
  """The config key that sizes the method's primary stream (named in errors)."""
  return f'config.{config.method}.batch_size' if _own(config, 'batch_size') is not None else 'config.batch_size'


def method_batch_sizes(config, method: base.Method) -> dict[str, int]:
  """The method's own split of its streams' batches (``Method.batch_sizes``: config.synth), else
  ``stream_batch_sizes``."""
  if method.batch_sizes is not None:
    return {s: int(method.batch_sizes[s]) for s in method.streams}
  return stream_batch_sizes(config, method.streams)


def stream_batch_sizes(config, streams: tuple[str, ...]) -> dict[str, int]:
  """The primary stream gets ``batch_size`` (or the method group's own, ``config.anogan.batch_size``);
  an unlabeled secondary stream ``unlabeled_batch_size``."""
  own = _own(config, 'batch_size')
  sizes = {streams[0]: config.batch_size if own is None else int(own)}
  for s in streams[1:]:
    sizes[s] = config.unlabeled_batch_size
  return sizes


def schedule(config, num_unlabeled: int) -> tuple[int, int]:
  """(steps_per_epoch, num_train_steps).

  An epoch is one pass's worth of the category's unlabeled training images at ``batch_size``, for
  every method: with 2-9 labeled images a pass over the labeled set would be a single step, and the
  paper's "decay every 30 epochs" would then decay every 30 steps. So all methods of a category train
  for the same number of steps and decay on the same schedule, unless the method's own config group
  sets ``num_train_steps`` (``config.anogan.num_train_steps``: a GAN needs longer than a U-Net).
  """
  steps_per_epoch = config.steps_per_epoch or max(1, math.ceil(num_unlabeled / config.batch_size))
  own = _own(config, 'num_train_steps')
  if own is not None:
    total = own
  elif config.num_train_steps is not None:
    total = config.num_train_steps
  else:
    total = config.num_epochs * steps_per_epoch
  if steps_per_epoch <= 0:
    raise ValueError(f'config.steps_per_epoch must be positive, got {steps_per_epoch}.')
  if total < 0:
    raise ValueError(f'config.num_train_steps must be >= 0, got {total}.')
  return steps_per_epoch, total


def validate_config(config) -> None:
  """Values that cannot work, reported with the key and the fix before anything is built."""
  if config.batch_size <= 0:
    raise ValueError(f'config.batch_size must be positive, got {config.batch_size}.')
  own = _own(config, 'batch_size')
  if own is not None and own <= 0:
    raise ValueError(f'config.{config.method}.batch_size must be positive (or unset: config.batch_size), got {own}.')
  if config.unlabeled_batch_size <= 0:
    raise ValueError(f'config.unlabeled_batch_size must be positive, got {config.unlabeled_batch_size}.')
  if config.eval_batch_size <= 0:
    raise ValueError(f'config.eval_batch_size must be positive, got {config.eval_batch_size}.')
  if config.log_every_steps <= 0:
    raise ValueError(f'config.log_every_steps must be positive, got {config.log_every_steps}.')
  if config.data.k_labeled < 0:
    raise ValueError(f'config.data.k_labeled must be >= 0 (0: zero-label mode, with config.synth), '
                     f'got {config.data.k_labeled}.')
  if config.data.test_to_unlabeled < 0:
    raise ValueError(f'config.data.test_to_unlabeled must be >= 0, got {config.data.test_to_unlabeled}.')
  if config.data.image_size <= 0:
    raise ValueError(f'config.data.image_size must be positive, got {config.data.image_size}.')
  base.check_diff_channels(config.model.diff_channels)  # the score maps of AE, PCA, AnoGAN; the trivial map
  validate_method(config)  # the method's own checks, before anything (a prerequisite, say) is trained


def resolve(config, workdir: str | None, resolve_prerequisites: PrerequisiteResolver, mesh=None,
            data: pipeline.CategoryData | None = None) -> Run:
  """The run of ``config`` in ``workdir``, its state not yet trained or restored.

  Order: the category's rules applied (once, here), config checks, mesh, data (process 0 prepares the
  dataset and writes split.json first), then ``resolve_prerequisites`` (the loop trains what is
  missing, restoring only restores), then the schedule, the method and its batch sizes.
  """
  config = categories.apply_category_rules(config)
  validate_config(config)
  mesh = mesh or sharding.create_mesh()
  if data is None:
    data = sharding.main_process_first(lambda: pipeline.load_category(config.data, workdir),
                                       'semiseg.load_category')
  resolved = resolve_prerequisites(config, workdir, mesh, data)
  steps_per_epoch, total = schedule(config, len(data.unlabeled))
  ctx = base.MethodContext(image_size=config.data.image_size, texture=data.texture,
                           steps_per_epoch=steps_per_epoch, unlabeled=data.unlabeled.images,
                           labeled=data.labeled)
  method = create_method(config, ctx, {name: state for name, (state, _) in resolved.items()})
  sizes = method_batch_sizes(config, method)
  for stream, size in sizes.items():
    if method.batch_sizes is not None:
      key = 'config.batch_size and config.synth.share'
    else:
      key = primary_batch_key(config) if stream == method.streams[0] else 'config.unlabeled_batch_size'
    sharding.check_batch_size(size, mesh, key)
    if len(getattr(data, stream)) == 0:
      hint = (' (config.data.k_labeled=0: only synthetic defects, config.synth.enabled=True with '
              'config.synth.share=1.0, train a U-Net method without labeled images)'
              if stream == 'labeled' and config.data.k_labeled == 0 else '')
      raise ValueError(f'The {stream} split of {config.data.name}/{config.data.category} is empty; '
                       f'{config.method} needs {stream} images{hint}.')
  return Run(config=config, workdir=workdir, mesh=mesh, data=data, ctx=ctx, method=method,
             steps_per_epoch=steps_per_epoch, num_train_steps=total, batch_sizes=sizes,
             prerequisite_workdirs={name: wd for name, (_, wd) in resolved.items()})
