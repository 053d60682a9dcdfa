"""DCGAN generator and discriminator (Radford et al. 2016) for AnoGAN (Schlegl et al. 2017), any 2**L size."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from semiseg.models.autoencoder import UpConv4x4


def bottom_size(image_size: int, levels: int) -> int:
  """Side of the lowest-resolution feature map; the image side must divide by 2**levels."""
  scale = 2 ** levels
  if image_size % scale or image_size < scale:
    raise ValueError(f'DCGAN image size {image_size} is not a multiple of 2**len(config.anogan.features) '
                     f'= {scale}: change config.data.image_size or config.anogan.features.')
  return image_size // scale


class Generator(nn.Module):
  """z -> Dense -> [s, s, features[-1]] -> stride-2 transposed convs -> sigmoid image in [0, 1].

  ``features`` lists widths from the full-resolution level down, like the discriminator's; the last
  transposed conv outputs the image itself. The transposed convs are ``UpConv4x4``: the same function and
  parameters as ``nn.ConvTranspose(f, (4, 4), strides=(2, 2), padding='SAME')``, computed as one 3x3
  convolution; on XLA:CPU the generator's forward + backward at batch 8, 64 px, took 23 ms with
  ``nn.ConvTranspose`` and 4 ms this way, which made the transposed convs' weight gradient most of a
  DCGAN step. LayerNorm over channels (per pixel, per sample) instead of
  BatchNorm: no batch statistics in the state, and one image's output does not depend on the batch,
  which the per-image latent search at inference needs.
  """
  features: Sequence[int] = (32, 64, 128, 256, 256)
  image_size: int = 256
  out_channels: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z_BxD: jax.Array) -> jax.Array:
    s = bottom_size(self.image_size, len(self.features))
    x = nn.Dense(s * s * self.features[-1], dtype=self.dtype)(z_BxD.astype(self.dtype))
    x = nn.relu(nn.LayerNorm(dtype=self.dtype)(x.reshape(-1, s, s, self.features[-1])))
    # Named as nn.ConvTranspose's auto-names were: checkpoints of the earlier generator still load.
    for i, f in enumerate(list(reversed(self.features))[1:]):
      x = UpConv4x4(f, dtype=self.dtype, name=f'ConvTranspose_{i}')(x)
      x = nn.relu(nn.LayerNorm(dtype=self.dtype)(x))
    x = UpConv4x4(self.out_channels, dtype=self.dtype, name=f'ConvTranspose_{len(self.features) - 1}')(x)
    return jax.nn.sigmoid(x.astype(jnp.float32))


class Discriminator(nn.Module):
  """Image -> stride-2 convs (LeakyReLU 0.2, no normalization) -> (logit_B, features_BxF).

  The features are the last conv level, flattened: AnoGAN's intermediate layer for the
  discrimination (feature-matching) loss of the latent search.
  """
  features: Sequence[int] = (32, 64, 128, 256, 256)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> tuple[jax.Array, jax.Array]:
    bottom_size(x_BxHxWxC.shape[1], len(self.features))
    x = x_BxHxWxC.astype(self.dtype)
    for f in self.features:
      x = nn.leaky_relu(nn.Conv(f, (4, 4), strides=(2, 2), padding='SAME', dtype=self.dtype)(x), 0.2)
    features_BxF = x.reshape(x.shape[0], -1).astype(jnp.float32)
    logit_B = nn.Dense(1, dtype=self.dtype)(x.reshape(x.shape[0], -1))[:, 0].astype(jnp.float32)
    return logit_B, features_BxF
