"""What every method shares: the state pytree, the method record, the optimizer and the losses."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from semiseg import augment
from semiseg.data import categories

Batch = dict[str, dict[str, jax.Array]]  # {'labeled': {'image', 'mask'}, 'unlabeled': {'image', 'mask'}}


@flax.struct.dataclass
class TrainState:
  """One pytree for every method; ``extras`` holds what a method adds (frozen AE, EMA teacher, ...)."""
  step: jax.Array
  params: Any
  opt_state: Any
  key: jax.Array  # raw uint32 PRNG key; the step's key is fold_in(key, step)
  extras: Any = None


@dataclasses.dataclass(frozen=True)
class Method:
  """How a method is created, trained and turned into score maps. The loop knows nothing else.

  Attributes:
    name: registry name.
    streams: data splits feeding ``train_step``, primary first: 'unlabeled' and/or 'labeled'.
    init: key -> TrainState (pure; run under jit with replicated out_shardings).
    train_step: pure (state, batch) -> (state, metrics dict of scalars); None for closed-form methods.
    score_map: pure (state, images_BxHxWx3 float in [0, 1]) -> scores_BxHxW in [0, 1].
    score_kind: 'probability' (thresholded at config.threshold) or 'anomaly' (threshold fitted by rule).
    solve: closed-form methods (pca): pure (state, unlabeled images_NxHxWx3 uint8) -> solved state, run
      once instead of train steps.
    reconstruct: optional (state, images) -> reconstruction, for figures.
    score_with_reconstruction: optional (state, images) -> (score map, reconstruction) from one pass, for
      a method whose reconstruction is costly (AnoGAN's latent search): evaluation then scores with it.
    extras: concrete arrays placed into a freshly initialized state's ``extras`` (init makes zeros of
      their shapes so that the state's structure, and so its checkpoint, is known before training).
  """
  name: str
  streams: tuple[str, ...]
  init: Callable[[jax.Array], TrainState]
  score_map: Callable[[TrainState, jax.Array], jax.Array]
  score_kind: str
  train_step: Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]] | None = None
  solve: Callable[[TrainState, jax.Array], TrainState] | None = None
  reconstruct: Callable[[TrainState, jax.Array], jax.Array] | None = None
  score_with_reconstruction: Callable[[TrainState, jax.Array], tuple[jax.Array, jax.Array]] | None = None
  extras: Any = None  # arrays the loop puts into a fresh state's ``extras`` (e.g. the frozen AE)
  # A name: at every log step the loop logs, under it, how ``score_map`` does on the labeled images
  # (training data: their masks are labels): pixel AUROC for anomaly scores, defect IoU at
  # config.threshold for probabilities; and watches the reconstruction, if any, for collapse.
  monitor: str | None = None
  monitor_maps: dict[str, Callable[[TrainState, jax.Array], jax.Array]] | None = None  # more maps, same measure
  # Per stream, arrays the loop computes once from the stream's stored uint8 images ([N, S, S, 3] ->
  # [N, ...], host numpy) and hands with every batch under their names, next to 'image' and 'mask'
  # (ae_unet: D of the stored labeled images, which a frozen AE makes the same at every step).
  # ``train_step`` must also work without them (a batch made elsewhere, e.g. the benchmark's).
  stream_fields: dict[str, dict[str, Callable[[np.ndarray], np.ndarray]]] | None = None
  # What the method decided when it was created from data (ae_unet: whether D enters), merged into
  # eval.json.
  info: dict[str, Any] | None = None
  # Config groups and keys that this method reads and most others do not ('anogan', 'model.unet_norm'):
  # a change to one leaves the other methods' finished grid cells finished (semiseg.grid.fingerprint).
  # A key no method declares is read by all. Each method module also exports it as CONFIG_KEYS.
  config_keys: tuple[str, ...] = ()
  # Global batch size of each stream when the method splits config.batch_size itself (config.synth: labeled
  # and unlabeled images); None: semiseg.run.stream_batch_sizes's rule.
  batch_sizes: dict[str, int] | None = None


@dataclasses.dataclass(frozen=True)
class MethodContext:
  """What a method's ``create`` needs to know of the run besides the config."""
  image_size: int  # network input side (texture crops)
  texture: bool
  steps_per_epoch: int
  # uint8 [N, S, S, 3] images of the unlabeled split at the stored size, for what a method fits on them
  # when it is created (ae_unet's D scale); None in contexts made without data (tests, benchmarks).
  unlabeled: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
  # The labeled split (``images`` uint8 [N, S, S, 3], ``masks`` [N, S, S, 1]), for decisions a method takes
  # on training labels when it is created (ae_unet's D gate); None like ``unlabeled``.
  labeled: Any = dataclasses.field(default=None, compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class Prerequisite:
  """Another method that must be trained before this one is created (ae_unet: its AE).

  A method module declares them in ``prerequisites(config) -> {name: Prerequisite}`` and receives
  them, trained, as ``create(config, ctx, trained)`` with ``trained[name]`` a finished TrainState.
  It never trains them itself: the loop (semiseg/train.py) trains or restores them first, evaluation
  and prediction only restore them, and the reproduce grid gives each its own cell.

  Attributes:
    config: the prerequisite's own run config (``config.method`` names it), derived from the dependent's.
    workdir_key: the top-level key of the dependent's config that names a workdir where it is already
      trained (then it is only restored); unset, the loop trains it in ``<workdir>/<name>``.
    allow_collapsed_key: the dependent's config key that allows building on a prerequisite whose
      training collapsed (semiseg/monitor.py's health.json); without it that is an error.
  """
  config: Any
  workdir_key: str
  allow_collapsed_key: str | None = None


def create_optimizer(learning_rate: float, decay_rate: float, transition_steps: int) -> optax.GradientTransformation:
  """Adam with the paper's staircase decay (x0.8 every 30 epochs, section 4.2)."""
  if learning_rate <= 0:
    raise ValueError(f'config.optim.learning_rate must be positive, got {learning_rate}.')
  if not 0 < decay_rate <= 1:
    raise ValueError(f'config.optim.decay_rate must be in (0, 1], got {decay_rate}.')
  schedule = optax.exponential_decay(learning_rate, transition_steps=max(1, transition_steps),
                                     decay_rate=decay_rate, staircase=True)
  return optax.adam(schedule)


def decay_every_steps(config, ctx: MethodContext) -> int:
  """Steps between two x decay_rate drops: config.optim.decay_every_steps when set, else
  decay_every_epochs epochs of ctx.steps_per_epoch."""
  steps = config.optim.get('decay_every_steps')
  if steps is None:
    return config.optim.decay_every_epochs * ctx.steps_per_epoch
  if steps <= 0:
    raise ValueError(f'config.optim.decay_every_steps must be positive (or unset), got {steps}.')
  return int(steps)


def optimizer_from_config(config, ctx: MethodContext) -> optax.GradientTransformation:
  return create_optimizer(config.optim.learning_rate, config.optim.decay_rate, decay_every_steps(config, ctx))


def augment_spec(config, ctx: MethodContext) -> augment.AugmentSpec:
  """``config.augment`` as a warp spec: border and flips as the category decides them (the data
  package's rules; values set by hand must agree), textures cropped to the network input."""
  a, c = config.augment, categories.settings(config)
  return augment.AugmentSpec(enabled=bool(a.enabled), max_rotation_deg=float(a.max_rotation_deg),
                             max_translate=float(a.max_translate), flip_x=bool(c.flip_x), flip_y=bool(c.flip_y),
                             border=str(c.border), crop_size=ctx.image_size if ctx.texture else None)


def check_divisible(image_size: int, scale: int, what: str) -> None:
  """The image side must halve cleanly through a network's ``scale`` = 2**levels."""
  if image_size % scale:
    raise ValueError(f'config.data.image_size={image_size} is not divisible by {what}={scale}: '
                     f'use a multiple of {scale}.')


# config.model.diff_channels: how a reconstruction method's score map reduces |I - reconstruction| over
# the colour channels (AE, PCA, AnoGAN, and the trivial |I - M| of evaluation alike).
DIFF_CHANNELS = ('mean', 'max')


def check_diff_channels(how: str) -> None:
  if how not in DIFF_CHANNELS:
    raise ValueError(f'config.model.diff_channels must be one of {DIFF_CHANNELS}, got {how!r}.')


def reduce_channels(diff_BxHxWxC, how: str):
  """The channel mean or max of a difference image (numpy or jax): 'max' keeps a defect that shows in
  one colour channel at its full contrast, 'mean' divides it by the channel count."""
  check_diff_channels(how)
  return diff_BxHxWxC.max(axis=-1) if how == 'max' else diff_BxHxWxC.mean(axis=-1)


def compute_dtype(name: str):
  if name not in ('float32', 'bfloat16'):
    raise ValueError(f"config.model.dtype must be 'float32' or 'bfloat16', got {name!r}.")
  return jnp.bfloat16 if name == 'bfloat16' else jnp.float32


def to_float(images_uint8: jax.Array) -> jax.Array:
  """uint8 pixels -> float32 in [0, 1] (paper 3.3), on the device."""
  return images_uint8.astype(jnp.float32) / 255.0


def sigmoid_bce(logits_BxHxWx1: jax.Array, mask_BxHxWx1: jax.Array, weight: jax.Array | None = None) -> jax.Array:
  """Pixel-wise sigmoid cross-entropy (paper eq. 5), averaged over (weighted) pixels."""
  loss = optax.sigmoid_binary_cross_entropy(logits_BxHxWx1, mask_BxHxWx1)
  if weight is None:
    return loss.mean()
  return (loss * weight).sum() / jnp.maximum(weight.sum(), 1.0)


def apply_updates(state: TrainState, grads: Any, tx: optax.GradientTransformation, **replace) -> TrainState:
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       opt_state=opt_state, **replace)


def step_key(state: TrainState) -> jax.Array:
  return jax.random.fold_in(state.key, state.step)


def count_params(params: Any) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))


def ema(teacher, student, decay):
  """teacher <- decay * teacher + (1 - decay) * student, leaf by leaf (Mean Teacher's teacher, AnoGAN's
  averaged generator)."""
  return jax.tree.map(lambda t, s: decay * t + (1.0 - decay) * s, teacher, student)


def ema_decay_at(step: jax.Array, ema_decay: float) -> jax.Array:
  """The reference code's warm-up (Tarvainen and Valpola 2017, update_ema_variables): the true average
  of the students so far until the exponential average is the better estimate,
  min(1 - 1 / (step + 1), ema_decay), ``step`` counting updates made (1 at the first)."""
  return jnp.minimum(1.0 - 1.0 / (step.astype(jnp.float32) + 1.0), ema_decay)
