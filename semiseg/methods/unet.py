"""``unet``: the supervised baseline, a U-Net on the image alone trained on the labeled images (eq. 5)."""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import optax

from semiseg import augment
from semiseg.methods import base, synthetic
from semiseg.models.unet import UNet


def validate(config) -> None:
  base.check_divisible(config.data.image_size, 2 ** config.model.unet_depth, '2**config.model.unet_depth')


# The head's bias starts at logit(PRIOR): the U-Net first predicts a defect probability of 1 % everywhere,
# near a defect image's share of defect pixels, instead of 0.5 (a large first loss on the rare class).
PRIOR = 0.01


def create_model(config) -> UNet:
  return UNet(features=config.model.unet_features, depth=config.model.unet_depth,
              dtype=base.compute_dtype(config.model.dtype), norm=config.model.unet_norm,
              head_bias_init=float(math.log(PRIOR / (1.0 - PRIOR))))


def supervised_batch(state: base.TrainState, batch: base.Batch, synth: synthetic.SynthSpec | None = None):
  """The labeled images and masks as floats, then (config.synth) the unlabeled images that carry synthetic
  defects, with their masks, both unwarped (stored size)."""
  parts = []
  if synth is None or synth.labeled:
    parts.append((base.to_float(batch['labeled']['image']), batch['labeled']['mask'].astype(jnp.float32)))
  if synth is not None and synth.enabled:
    parts.append(synthetic.defects(base.step_key(state), batch['unlabeled']['image'], synth))
  if len(parts) == 1:
    return parts[0]
  return tuple(jnp.concatenate(x) for x in zip(*parts))


def augmented_labeled(state: base.TrainState, batch: base.Batch, spec: augment.AugmentSpec,
                      synth: synthetic.SynthSpec | None = None):
  """The labeled (and synthetic) images and masks as floats, through the same random rigid warp."""
  images, masks = supervised_batch(state, batch, synth)
  images, masks, _ = augment.augment_batch(base.step_key(state), images, masks, spec)
  return images, masks


def train_step(state: base.TrainState, batch: base.Batch, *, model: UNet, tx: optax.GradientTransformation,
               spec: augment.AugmentSpec, synth: synthetic.SynthSpec | None = None):
  images, masks = augmented_labeled(state, batch, spec, synth)

  def loss_fn(params):
    return base.sigmoid_bce(model.apply(params, images), masks)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return base.apply_updates(state, grads, tx), {'loss': loss}


def score_map(state: base.TrainState, images_BxHxWx3: jax.Array, *, model: UNet) -> jax.Array:
  return jax.nn.sigmoid(model.apply(state.params, images_BxHxWx3)[..., 0])


def init(key: jax.Array, *, model: UNet, tx, image_size: int, in_channels: int = 3, extras=None) -> base.TrainState:
  init_key, state_key = jax.random.split(key)
  params = model.init(init_key, jnp.zeros((1, image_size, image_size, in_channels), jnp.float32))
  return base.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                         key=state_key, extras=extras)


# The keys only the U-Net family reads (Method.config_keys): changing one keeps the grid's other cells.
CONFIG_KEYS = ('model.unet_features', 'model.unet_depth', 'model.unet_norm', 'synth')


def streams(synth: synthetic.SynthSpec, primary: tuple[str, ...] = ('labeled',),
            own_unlabeled: int | None = None) -> tuple[tuple[str, ...], dict[str, int] | None]:
  """(Method.streams, Method.batch_sizes): ``primary`` and the run's rule without synthetic defects."""
  if not synth.enabled:
    return primary, None
  return synthetic.streams_and_sizes(synth, own_unlabeled)


def create(config, ctx: base.MethodContext) -> base.Method:
  model = create_model(config)
  tx = base.optimizer_from_config(config, ctx)
  spec = base.augment_spec(config, ctx)
  synth = synthetic.from_config(config)
  names, sizes = streams(synth)
  return base.Method(
      name='unet', streams=names, batch_sizes=sizes, score_kind='probability', config_keys=CONFIG_KEYS,
      init=partial(init, model=model, tx=tx, image_size=ctx.image_size),
      train_step=partial(train_step, model=model, tx=tx, spec=spec, synth=synth if synth.enabled else None),
      score_map=partial(score_map, model=model))
