"""Convolutional autoencoder with a dense bottleneck (paper 3.1, Figure 3; latent 500 by default)."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class ConvAutoencoder(nn.Module):
  """Strided-conv encoder -> Dense(latent_dim) -> mirrored decoder; output in [0, 1].

  Each entry of ``features`` is one encoder level: a 4x4 stride-2 convolution (halving H and W)
  followed by a 3x3 convolution, LeakyReLU after each. The decoder mirrors it with 4x4 stride-2
  transposed convolutions, and a final 3x3 convolution + sigmoid gives the reconstruction.
  """
  features: Sequence[int] = (32, 64, 128, 256, 256)
  latent_dim: int = 500
  out_channels: int = 3
  dtype: Any = jnp.float32

  def setup(self):
    self.down = [(nn.Conv(f, (4, 4), strides=(2, 2), padding='SAME', dtype=self.dtype),
                  nn.Conv(f, (3, 3), padding='SAME', dtype=self.dtype)) for f in self.features]
    self.to_latent = nn.Dense(self.latent_dim, dtype=self.dtype)
    self.up = [(nn.ConvTranspose(f, (4, 4), strides=(2, 2), padding='SAME', dtype=self.dtype),
                nn.Conv(f, (3, 3), padding='SAME', dtype=self.dtype))
               for f in list(reversed(self.features))[1:] + [self.features[0]]]
    self.head = nn.Conv(self.out_channels, (3, 3), padding='SAME', dtype=self.dtype)

  def _bottom_shape(self, h: int, w: int) -> tuple[int, int, int]:
    scale = 2 ** len(self.features)
    if h % scale or w % scale:
      raise ValueError(f'Autoencoder input {h}x{w} is not divisible by 2**len(ae_features) = {scale}: '
                       'change config.data.image_size or config.model.ae_features.')
    return h // scale, w // scale, self.features[-1]

  def encode(self, x_BxHxWxC: jnp.ndarray) -> jnp.ndarray:
    x = x_BxHxWxC.astype(self.dtype)
    for strided, conv in self.down:
      x = nn.leaky_relu(strided(x), 0.2)
      x = nn.leaky_relu(conv(x), 0.2)
    return self.to_latent(x.reshape(x.shape[0], -1))

  def decode(self, z_BxD: jnp.ndarray, hw: tuple[int, int]) -> jnp.ndarray:
    bh, bw, bc = self._bottom_shape(*hw)
    x = self.from_latent(z_BxD, bh * bw * bc).reshape(-1, bh, bw, bc)
    for upconv, conv in self.up:
      x = nn.leaky_relu(upconv(x), 0.2)
      x = nn.leaky_relu(conv(x), 0.2)
    return jax.nn.sigmoid(self.head(x).astype(jnp.float32))

  @nn.compact
  def from_latent(self, z_BxD: jnp.ndarray, size: int) -> jnp.ndarray:
    return nn.leaky_relu(nn.Dense(size, dtype=self.dtype, name='from_latent_dense')(z_BxD), 0.2)

  def __call__(self, x_BxHxWxC: jnp.ndarray) -> jnp.ndarray:
    """Reconstruction of ``x`` (values in [0, 1]), same shape, float32."""
    self._bottom_shape(*x_BxHxWxC.shape[1:3])
    return self.decode(self.encode(x_BxHxWxC), x_BxHxWxC.shape[1:3])
