"""``pca``: linear reconstruction baseline; exact SVD of the unlabeled images, score |I - clip(recon)|."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from semiseg import augment
from semiseg.methods import base


def flatten(images_NxHxWxC: jax.Array) -> jax.Array:
  return images_NxHxWxC.reshape(images_NxHxWxC.shape[0], -1)


def principal_basis(data_NxD: jax.Array, num_components: int, variance: float, max_components: int):
  """(mean_D, components_KxD) with K = num_components, or max_components rows of which the first k
  (the fewest reaching ``variance`` of the total) are kept and the rest zero.

  Exact (not randomized) PCA through the N x N Gram matrix: for N (a few hundred) << D that costs
  O(N^2 D) time and N x D memory; a thin SVD of the N x D matrix gives the same subspace but took 30x
  longer on a CPU (300 x 196608: 100 s against 3 s). The kept rows are then made orthonormal to
  float32 precision (a K x K polar step), so the projection stays a projection.
  """
  hi = jax.lax.Precision.HIGHEST
  mean_D = data_NxD.mean(axis=0)
  x_NxD = data_NxD - mean_D
  eig_N, u_NxN = jnp.linalg.eigh(jnp.matmul(x_NxD, x_NxD.T, precision=hi))
  eig_N, u_NxN = jnp.maximum(eig_N[::-1], 0.0), u_NxN[:, ::-1]  # descending: eig = singular value^2
  size = num_components if num_components > 0 else max_components
  if num_components > 0:
    num_kept = num_components
  else:
    ratio_N = jnp.cumsum(eig_N) / jnp.maximum(eig_N.sum(), 1e-30)
    num_kept = jnp.sum(ratio_N < variance - 1e-6) + 1  # the fewest components reaching the variance
  n = eig_N.shape[0]
  if n < size:  # fewer images than components: pad; the padding rows are never kept
    eig_N = jnp.concatenate([eig_N, jnp.zeros((size - n,), eig_N.dtype)])
    u_NxN = jnp.concatenate([u_NxN, jnp.zeros((n, size - n), u_NxN.dtype)], axis=1)
  eig_K, u_NxK = eig_N[:size], u_NxN[:, :size]
  # Directions with no variance (rank N - 1 after centring, padding) are arbitrary: never kept.
  keep_K = (jnp.arange(size) < num_kept) & (eig_K > 1e-6 * jnp.maximum(eig_N[0], 1e-30))
  scale_K = jnp.where(keep_K, jax.lax.rsqrt(jnp.where(keep_K, eig_K, 1.0)), 0.0)
  v_KxD = jnp.matmul((u_NxK * scale_K).T, x_NxD, precision=hi)  # v_i = X^T u_i / s_i
  # Polar step: (V V^T)^(-1/2) V; V V^T is I (kept) / 0 (dropped) up to float32 rounding of the Gram.
  w_K, q_KxK = jnp.linalg.eigh(jnp.matmul(v_KxD, v_KxD.T, precision=hi))
  inv_sqrt_K = jnp.where(w_K > 0.5, jax.lax.rsqrt(jnp.maximum(w_K, 0.5)), 0.0)
  v_KxD = jnp.matmul((q_KxK * inv_sqrt_K) @ q_KxK.T, v_KxD, precision=hi)
  return mean_D, v_KxD


def solve(state: base.TrainState, images_uint8_NxHxWx3: jax.Array, *, image_size: int, texture: bool,
          num_components: int, variance: float, max_components: int) -> base.TrainState:
  """The basis of the unlabeled images; textures are cut into image_size tiles like at test time."""
  images = base.to_float(images_uint8_NxHxWx3)
  if texture:
    images = augment.to_tiles(images, image_size)
  if images.shape[1:3] != (image_size, image_size):
    raise ValueError(f'pca: training images are {images.shape[1:3]} but config.data.image_size={image_size}.')
  mean_D, components_KxD = principal_basis(flatten(images), num_components, variance, max_components)
  return state.replace(step=jnp.ones((), jnp.int32),
                       params={'mean': mean_D, 'components': components_KxD})


def reconstruct(state: base.TrainState, images_BxHxWx3: jax.Array) -> jax.Array:
  mean_D, components_KxD = state.params['mean'], state.params['components']
  x_BxD = flatten(images_BxHxWx3) - mean_D
  # HIGHEST: the default CPU/TPU matmul precision may drop to bf16 passes and blur the projection.
  codes_BxK = jnp.matmul(x_BxD, components_KxD.T, precision=jax.lax.Precision.HIGHEST)
  recon_BxD = jnp.matmul(codes_BxK, components_KxD, precision=jax.lax.Precision.HIGHEST) + mean_D
  return recon_BxD.reshape(images_BxHxWx3.shape)


def score_map(state: base.TrainState, images_BxHxWx3: jax.Array, channels: str = 'mean') -> jax.Array:
  """Anomaly score: the channel mean (or max, config.model.diff_channels) of |I - clip(recon, 0, 1)|, in [0, 1]."""
  recon = jnp.clip(reconstruct(state, images_BxHxWx3), 0.0, 1.0)
  return base.reduce_channels(jnp.abs(images_BxHxWx3 - recon), channels)


def init(key: jax.Array, *, image_size: int, num_components: int, max_components: int) -> base.TrainState:
  d = image_size * image_size * 3
  k = num_components if num_components > 0 else max_components
  params = {'mean': jnp.zeros((d,), jnp.float32), 'components': jnp.zeros((k, d), jnp.float32)}
  return base.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=(), key=key)


CONFIG_KEYS = ('pca',)  # read by this method only (Method.config_keys)


def create(config, ctx: base.MethodContext) -> base.Method:
  c = config.pca
  num_components, variance, max_components = int(c.num_components), float(c.variance), int(c.max_components)
  if num_components < 0:
    raise ValueError(f'config.pca.num_components must be >= 0 (0: choose by config.pca.variance), '
                     f'got {num_components}.')
  if num_components == 0 and not 0 < variance <= 1:
    raise ValueError(f'config.pca.variance must be in (0, 1], got {variance}.')
  if num_components == 0 and max_components <= 0:
    raise ValueError(f'config.pca.max_components must be positive, got {max_components}.')
  return base.Method(
      name='pca', streams=('unlabeled',), score_kind='anomaly', config_keys=CONFIG_KEYS,
      init=partial(init, image_size=ctx.image_size, num_components=num_components,
                   max_components=max_components),
      solve=partial(solve, image_size=ctx.image_size, texture=ctx.texture, num_components=num_components,
                  variance=variance, max_components=max_components),
      score_map=partial(score_map, channels=config.model.diff_channels),
      reconstruct=reconstruct)
