"""``ae``: the convolutional autoencoder trained on unlabeled images; score map |I - AE(I)| (paper 3.1)."""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import optax

from semiseg import augment
from semiseg.methods import base
from semiseg.models.autoencoder import ConvAutoencoder


def gaussian_window(size: int = 11, sigma: float = 1.5) -> jax.Array:
  x = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
  g = jnp.exp(-(x ** 2) / (2 * sigma ** 2))
  return g / g.sum()


def reconstruction_loss(recon: jax.Array, target: jax.Array) -> jax.Array:
  """Per-pixel MSE (paper eq. 2)."""
  return jnp.mean((recon - target) ** 2)


def train_step(state: base.TrainState, batch: base.Batch, *, model: ConvAutoencoder,
               tx: optax.GradientTransformation, spec: augment.AugmentSpec):
  images = base.to_float(batch['unlabeled']['image'])
  images, _, _ = augment.augment_batch(base.step_key(state), images, None, spec)

  def loss_fn(params):
    return reconstruction_loss(model.apply(params, images), images)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return base.apply_updates(state, grads, tx), {'loss': loss}


def reconstruct(state: base.TrainState, images_BxHxWx3: jax.Array, *, model: ConvAutoencoder) -> jax.Array:
  return model.apply(state.params, images_BxHxWx3)


def blur(maps_BxHxWxC: jax.Array, sigma: float) -> jax.Array:
  """Gaussian blur per channel (truncated at 3 sigma, edges repeated); identity for sigma <= 0."""
  if sigma <= 0:
    return maps_BxHxWxC
  radius = max(1, int(round(3 * sigma)))
  g = gaussian_window(2 * radius + 1, sigma)
  c = maps_BxHxWxC.shape[-1]
  # Edges repeated by gathering clipped indices: the same values as jnp.pad(mode='edge'), whose
  # concatenation of broadcast edge slices jax2onnx converts with the traced batch size, not the
  # exported symbolic one (ONNX Runtime then refuses batches of another size).
  h, w = maps_BxHxWxC.shape[1:3]
  rows_idx = jnp.clip(jnp.arange(-radius, h + radius), 0, h - 1)
  cols_idx = jnp.clip(jnp.arange(-radius, w + radius), 0, w - 1)
  padded = jnp.take(jnp.take(maps_BxHxWxC, rows_idx, axis=1), cols_idx, axis=2)
  dims = ('NHWC', 'HWIO', 'NHWC')
  rows = jax.lax.conv_general_dilated(padded, g[:, None, None, None] * jnp.ones((1, 1, 1, c)), (1, 1),
                                      'VALID', feature_group_count=c, dimension_numbers=dims)
  return jax.lax.conv_general_dilated(rows, g[None, :, None, None] * jnp.ones((1, 1, 1, c)), (1, 1),
                                      'VALID', feature_group_count=c, dimension_numbers=dims)


def difference(ae_params, images_BxHxWx3: jax.Array, model: ConvAutoencoder, sigma: float = 0.0) -> jax.Array:
  """D = |I - AE(I)| per channel (paper eq. 3), blurred by ``sigma`` px (config.model.diff_blur)."""
  return blur(jnp.abs(images_BxHxWx3 - model.apply(ae_params, images_BxHxWx3)), sigma)


def score_map(state: base.TrainState, images_BxHxWx3: jax.Array, *, model: ConvAutoencoder,
              sigma: float = 0.0, channels: str = 'mean') -> jax.Array:
  """Anomaly score map: the channel mean (or max, config.model.diff_channels) of D, about in [0, 1]."""
  return base.reduce_channels(difference(state.params, images_BxHxWx3, model, sigma), channels)


AUGMENT = ('same', 'flips', 'none')


def validate(config) -> None:
  base.check_divisible(config.data.image_size, 2 ** len(config.model.ae_features),
                       '2**len(config.model.ae_features)')
  if config.ae_augment not in AUGMENT:
    raise ValueError(f'config.ae_augment must be one of {AUGMENT}, got {config.ae_augment!r}.')
  if config.model.diff_blur < 0:
    raise ValueError(f'config.model.diff_blur must be >= 0, got {config.model.diff_blur}.')


def create_model(config) -> ConvAutoencoder:
  return ConvAutoencoder(features=tuple(config.model.ae_features), latent_dim=config.model.latent_dim,
                         dtype=base.compute_dtype(config.model.dtype), bottleneck=config.model.ae_bottleneck,
                         normalize=config.model.ae_normalize)


def ae_augment_spec(config, ctx: base.MethodContext) -> augment.AugmentSpec:
  """The AE's own warps (config.ae_augment): the run's, flips only, or none (textures keep their crop)."""
  spec = base.augment_spec(config, ctx)
  if config.ae_augment == 'flips':
    return dataclasses.replace(spec, max_rotation_deg=0.0, max_translate=0.0)
  if config.ae_augment == 'none':
    return dataclasses.replace(spec, enabled=False)
  return spec


def init(key: jax.Array, *, model: ConvAutoencoder, tx, image_size: int) -> base.TrainState:
  init_key, state_key = jax.random.split(key)
  params = model.init(init_key, jnp.zeros((1, image_size, image_size, 3), jnp.float32))
  return base.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                         key=state_key)


MONITOR = 'diff_auroc_labeled'  # pixel AUROC of the score map on the labeled images, at log steps


def decay_every_steps(config, ctx: base.MethodContext) -> int:
  """The AE's steps between two x decay_rate drops: config.ae_decay_every_steps when set, else the run's."""
  steps = config.get('ae_decay_every_steps')
  if steps is None:
    return base.decay_every_steps(config, ctx)
  if int(steps) <= 0:
    raise ValueError(f'config.ae_decay_every_steps must be positive (or unset: config.optim\'s schedule), '
                     f'got {steps}.')
  return int(steps)


CONFIG_KEYS = ()  # the AE reads only keys other methods read too


def create(config, ctx: base.MethodContext) -> base.Method:
  model = create_model(config)
  lr = config.ae_learning_rate or config.optim.learning_rate
  tx = base.create_optimizer(lr, config.optim.decay_rate, decay_every_steps(config, ctx))
  spec = ae_augment_spec(config, ctx)
  sigma = float(config.model.diff_blur)
  return base.Method(
      name='ae', streams=('unlabeled',), score_kind='anomaly', config_keys=CONFIG_KEYS,
      init=partial(init, model=model, tx=tx, image_size=ctx.image_size),
      train_step=partial(train_step, model=model, tx=tx, spec=spec),
      score_map=partial(score_map, model=model, sigma=sigma, channels=config.model.diff_channels),
      reconstruct=partial(reconstruct, model=model),
      monitor=MONITOR)
