"""``anogan``: a DCGAN on the unlabeled images; score |I - G(z*)| with z* found per image (Schlegl et al. 2017)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import optax

from semiseg import augment
from semiseg.methods import base
from semiseg.models.dcgan import Discriminator, Generator, bottom_size


def gan_losses(params, images_BxHxWx3: jax.Array, z_BxD: jax.Array, *, g_model: Generator,
               d_model: Discriminator) -> tuple[jax.Array, jax.Array]:
  """(d_loss, g_loss): D's cross-entropy on real (1) / fake (0), G's non-saturating -log D(G(z))."""
  fake = g_model.apply(params['g'], z_BxD)
  real_logit, _ = d_model.apply(params['d'], images_BxHxWx3)
  fake_logit, _ = d_model.apply(params['d'], fake)
  d_loss = (optax.sigmoid_binary_cross_entropy(real_logit, jnp.ones_like(real_logit)).mean()
            + optax.sigmoid_binary_cross_entropy(fake_logit, jnp.zeros_like(fake_logit)).mean())
  g_loss = optax.sigmoid_binary_cross_entropy(fake_logit, jnp.ones_like(fake_logit)).mean()
  return d_loss, g_loss


def generator_params(state: base.TrainState):
  """The generator the latent search inverts: the EMA of the trained generators where
  config.anogan.g_ema_decay > 0 keeps one, else the last one."""
  extras = state.extras or {}
  return extras['g_ema'] if 'g_ema' in extras else state.params['g']


def train_step(state: base.TrainState, batch: base.Batch, *, g_model: Generator, d_model: Discriminator,
               tx_g: optax.GradientTransformation, tx_d: optax.GradientTransformation,
               spec: augment.AugmentSpec, latent_dim: int, g_ema_decay: float = 0.0):
  """One D update, then one G update against the updated D (the usual alternation), in one step; then,
  with ``g_ema_decay`` > 0, the generator's EMA (warmed up as Mean Teacher's) follows the new generator."""
  key = base.step_key(state)
  k_aug, k_zd, k_zg = jax.random.split(key, 3)
  images = base.to_float(batch['unlabeled']['image'])
  images, _, _ = augment.augment_batch(k_aug, images, None, spec)
  b = images.shape[0]
  losses = partial(gan_losses, images_BxHxWx3=images, g_model=g_model, d_model=d_model)

  z_d = jax.random.normal(k_zd, (b, latent_dim), jnp.float32)
  d_loss, d_grads = jax.value_and_grad(lambda d: losses({'g': state.params['g'], 'd': d}, z_BxD=z_d)[0])(
      state.params['d'])
  d_updates, d_opt = tx_d.update(d_grads, state.opt_state['d'], state.params['d'])
  d_params = optax.apply_updates(state.params['d'], d_updates)

  z_g = jax.random.normal(k_zg, (b, latent_dim), jnp.float32)
  g_loss, g_grads = jax.value_and_grad(lambda g: losses({'g': g, 'd': d_params}, z_BxD=z_g)[1])(
      state.params['g'])
  g_updates, g_opt = tx_g.update(g_grads, state.opt_state['g'], state.params['g'])
  g_params = optax.apply_updates(state.params['g'], g_updates)

  new = state.replace(step=state.step + 1, params={'g': g_params, 'd': d_params},
                      opt_state={'g': g_opt, 'd': d_opt})
  if g_ema_decay > 0:
    new = new.replace(extras={'g_ema': base.ema(state.extras['g_ema'], g_params,
                                                base.ema_decay_at(new.step, g_ema_decay))})
  # 'loss' is the sum of the two players' losses: a health signal (finite, bounded), not a target.
  return new, {'loss': d_loss + g_loss, 'd_loss': d_loss, 'g_loss': g_loss}


def search_loss(z_D: jax.Array, image_HxWx3: jax.Array, real_features_F: jax.Array, *, params,
                g_model: Generator, d_model: Discriminator, weight: float) -> jax.Array:
  """AnoGAN's mapping loss (1 - lambda) R + lambda D: R = sum |x - G(z)|, D = sum |f(x) - f(G(z))|."""
  fake = g_model.apply(params['g'], z_D[None])
  _, fake_features = d_model.apply(params['d'], fake)
  residual = jnp.abs(image_HxWx3 - fake[0]).sum()
  discrimination = jnp.abs(real_features_F - fake_features[0]).sum()
  return (1.0 - weight) * residual + weight * discrimination


def search_latent(state: base.TrainState, images_BxHxWx3: jax.Array, *, g_model: Generator,
                  d_model: Discriminator, latent_dim: int, steps: int, learning_rate: float,
                  weight: float) -> tuple[jax.Array, jax.Array]:
  """(z*_BxD, final search loss_B): ``steps`` Adam steps per image from a fixed prior draw, vmapped."""
  b = images_BxHxWx3.shape[0]
  # A fixed key: the same image in the same batch slot always gets the same score.
  z0_BxD = jax.random.normal(jax.random.fold_in(state.key, 0x5EA4C), (b, latent_dim), jnp.float32)
  _, real_features_BxF = d_model.apply(state.params['d'], images_BxHxWx3)
  tx = optax.adam(learning_rate)
  params = {'g': generator_params(state), 'd': state.params['d']}
  loss_fn = partial(search_loss, params=params, g_model=g_model, d_model=d_model, weight=weight)

  def one(z0_D, image, real_features_F):
    grad_fn = jax.value_and_grad(loss_fn)

    def body(_, carry):
      z, opt = carry
      _, g = grad_fn(z, image, real_features_F)
      updates, opt = tx.update(g, opt, z)
      return optax.apply_updates(z, updates), opt

    z, _ = jax.lax.fori_loop(0, steps, body, (z0_D, tx.init(z0_D)))
    return z, loss_fn(z, image, real_features_F)

  return jax.vmap(one)(z0_BxD, images_BxHxWx3, jax.lax.stop_gradient(real_features_BxF))


def reconstruct(state: base.TrainState, images_BxHxWx3: jax.Array, **search) -> jax.Array:
  z_BxD, _ = search_latent(state, images_BxHxWx3, **search)
  return search['g_model'].apply(generator_params(state), z_BxD)


def score_with_reconstruction(state: base.TrainState, images_BxHxWx3: jax.Array, channels: str = 'mean',
                              **search) -> tuple[jax.Array, jax.Array]:
  """(score map, G(z*)) from one latent search: the score is the channel mean (or max,
  config.model.diff_channels) of |I - G(z*)|, in [0, 1] (G ends in a sigmoid)."""
  recon = reconstruct(state, images_BxHxWx3, **search)
  return base.reduce_channels(jnp.abs(images_BxHxWx3 - recon), channels), recon


def score_map(state: base.TrainState, images_BxHxWx3: jax.Array, channels: str = 'mean', **search) -> jax.Array:
  """Anomaly score: ``score_with_reconstruction``'s map alone."""
  return score_with_reconstruction(state, images_BxHxWx3, channels, **search)[0]


def init(key: jax.Array, *, g_model: Generator, d_model: Discriminator, tx_g, tx_d, image_size: int,
         latent_dim: int, g_ema_decay: float = 0.0) -> base.TrainState:
  k_g, k_d, state_key = jax.random.split(key, 3)
  params = {'g': g_model.init(k_g, jnp.zeros((1, latent_dim), jnp.float32)),
            'd': d_model.init(k_d, jnp.zeros((1, image_size, image_size, 3), jnp.float32))}
  # A copy, not an alias: the loop donates the state, and one buffer must not be donated twice.
  extras = {'g_ema': jax.tree.map(jnp.copy, params['g'])} if g_ema_decay > 0 else None
  return base.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                         opt_state={'g': tx_g.init(params['g']), 'd': tx_d.init(params['d'])}, key=state_key,
                         extras=extras)


CONFIG_KEYS = ('anogan',)  # read by this method only (Method.config_keys)


def create(config, ctx: base.MethodContext) -> base.Method:
  c = config.anogan
  features = tuple(int(f) for f in c.features)
  if not features or min(features) <= 0:
    raise ValueError(f'config.anogan.features must be a non-empty tuple of positive widths, got {c.features}.')
  bottom_size(ctx.image_size, len(features))  # raises naming config.anogan.features
  if int(c.latent_dim) <= 0:
    raise ValueError(f'config.anogan.latent_dim must be positive, got {c.latent_dim}.')
  if int(c.search_steps) < 0:
    raise ValueError(f'config.anogan.search_steps must be >= 0, got {c.search_steps}.')
  for key in ('learning_rate', 'search_learning_rate'):
    if float(c[key]) <= 0:
      raise ValueError(f'config.anogan.{key} must be positive, got {c[key]}.')
  if not 0 <= float(c.b1) < 1:
    raise ValueError(f'config.anogan.b1 must be in [0, 1), got {c.b1}.')
  g_ema_decay = float(c.g_ema_decay)
  if not 0 <= g_ema_decay < 1:
    raise ValueError(f'config.anogan.g_ema_decay must be in [0, 1) (0: no average), got {c.g_ema_decay}.')
  if not 0 <= float(c.discrimination_weight) <= 1:
    raise ValueError(f'config.anogan.discrimination_weight must be in [0, 1], got {c.discrimination_weight}.')
  dtype = base.compute_dtype(config.model.dtype)
  g_model = Generator(features=features, image_size=ctx.image_size, dtype=dtype)
  d_model = Discriminator(features=features, dtype=dtype)
  tx_g = optax.adam(float(c.learning_rate), b1=float(c.b1))
  tx_d = optax.adam(float(c.learning_rate), b1=float(c.b1))
  latent_dim = int(c.latent_dim)
  spec = base.augment_spec(config, ctx)
  search = dict(g_model=g_model, d_model=d_model, latent_dim=latent_dim, steps=int(c.search_steps),
                learning_rate=float(c.search_learning_rate), weight=float(c.discrimination_weight))
  return base.Method(
      name='anogan', streams=('unlabeled',), score_kind='anomaly', config_keys=CONFIG_KEYS,
      init=partial(init, g_model=g_model, d_model=d_model, tx_g=tx_g, tx_d=tx_d, image_size=ctx.image_size,
                   latent_dim=latent_dim, g_ema_decay=g_ema_decay),
      train_step=partial(train_step, g_model=g_model, d_model=d_model, tx_g=tx_g, tx_d=tx_d, spec=spec,
                         latent_dim=latent_dim, g_ema_decay=g_ema_decay),
      score_map=partial(score_map, channels=config.model.diff_channels, **search),
      reconstruct=partial(reconstruct, **search),
      score_with_reconstruction=partial(score_with_reconstruction, channels=config.model.diff_channels, **search))
