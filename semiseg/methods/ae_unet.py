"""``ae_unet``: the paper's method. U-Net on concat[I, |I - AE(I)|] with the AE frozen (eq. 3-5)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import jax
import jax.numpy as jnp
import optax
from ml_collections import config_dict

from semiseg import augment
from semiseg.methods import autoencoder, base, unet
from semiseg.models.autoencoder import ConvAutoencoder
from semiseg.models.unet import UNet

INPUTS = ('image', 'diff', 'image+diff')  # the paper's Table 4 ablation


def validate(config) -> None:
  unet.validate(config)
  autoencoder.validate(config)
  if config.model.unet_input not in INPUTS:
    raise ValueError(f'config.model.unet_input must be one of {INPUTS}, got {config.model.unet_input!r}.')


def unet_input(images_BxHxWx3: jax.Array, ae_params, ae_model: ConvAutoencoder, mode: str,
               sigma: float = 0.0) -> jax.Array:
  """The U-Net's input for an ablation mode; D comes from the frozen AE (no gradient reaches it)."""
  if mode == 'image':
    return images_BxHxWx3
  diff = jax.lax.stop_gradient(autoencoder.difference(ae_params, images_BxHxWx3, ae_model, sigma))
  if mode == 'diff':
    return diff
  return jnp.concatenate([images_BxHxWx3, diff], axis=-1)


def train_step(state: base.TrainState, batch: base.Batch, *, model: UNet, ae_model: ConvAutoencoder,
               tx: optax.GradientTransformation, spec: augment.AugmentSpec, mode: str, sigma: float):
  images, masks = unet.augmented_labeled(state, batch, spec)
  inputs = unet_input(images, state.extras['ae_params'], ae_model, mode, sigma)

  def loss_fn(params):
    return base.sigmoid_bce(model.apply(params, inputs), masks)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return base.apply_updates(state, grads, tx), {'loss': loss}


def score_map(state: base.TrainState, images_BxHxWx3: jax.Array, *, model: UNet, ae_model: ConvAutoencoder,
            mode: str, sigma: float) -> jax.Array:
  inputs = unet_input(images_BxHxWx3, state.extras['ae_params'], ae_model, mode, sigma)
  return jax.nn.sigmoid(model.apply(state.params, inputs)[..., 0])


def reconstruct(state: base.TrainState, images_BxHxWx3: jax.Array, *, ae_model: ConvAutoencoder) -> jax.Array:
  return ae_model.apply(state.extras['ae_params'], images_BxHxWx3)


def init(key: jax.Array, *, model: UNet, tx, image_size: int, in_channels: int, ae_abstract) -> base.TrainState:
  # Zeros of the AE's shapes keep the state's structure fixed; the loop puts the trained AE in.
  extras = {'ae_params': jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), ae_abstract)}
  return unet.init(key, model=model, tx=tx, image_size=image_size, in_channels=in_channels, extras=extras)


def ae_config(config) -> config_dict.ConfigDict:
  """The AE that ae_unet uses: its own config as method 'ae' (same data, seed and sizes), trained for
  ``ae_num_train_steps`` when set."""
  ae = config_dict.ConfigDict(config.to_dict(), type_safe=False)
  ae.method = 'ae'
  if config.get('ae_num_train_steps'):
    ae.num_train_steps = config.ae_num_train_steps
  return ae


def prerequisites(config) -> dict[str, base.Prerequisite]:
  """A trained AE (paper 3.2): in ``config.ae_workdir`` when set, else trained in ``<workdir>/ae``."""
  return {'ae': base.Prerequisite(config=ae_config(config), workdir_key='ae_workdir',
                                  allow_collapsed_key='ae_allow_collapsed')}


def create(config, ctx: base.MethodContext, trained: Mapping[str, base.TrainState]) -> base.Method:
  return create_with_ae(config, ctx, trained['ae'].params)


def create_with_ae(config, ctx: base.MethodContext, ae_params) -> base.Method:
  """The method around already trained AE parameters."""
  validate(config)
  mode = config.model.unet_input
  ae_model = autoencoder.create_model(config)
  model = unet.create_model(config)
  tx = base.optimizer_from_config(config, ctx)
  spec = base.augment_spec(config, ctx)
  in_channels = {'image': 3, 'diff': 3, 'image+diff': 6}[mode]
  ae_abstract = jax.eval_shape(lambda: ae_params)
  sigma = float(config.model.diff_blur)
  return base.Method(
      name='ae_unet', streams=('labeled',), score_kind='probability',
      init=partial(init, model=model, tx=tx, image_size=ctx.image_size, in_channels=in_channels,
                   ae_abstract=ae_abstract),
      train_step=partial(train_step, model=model, ae_model=ae_model, tx=tx, spec=spec, mode=mode, sigma=sigma),
      score_map=partial(score_map, model=model, ae_model=ae_model, mode=mode, sigma=sigma),
      reconstruct=partial(reconstruct, ae_model=ae_model),
      extras={'ae_params': ae_params})
