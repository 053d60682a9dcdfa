"""Convolutional autoencoder with a dense bottleneck (paper 3.1, Figure 3; latent 500 by default)."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class UpConv4x4(nn.Module):
  """``nn.ConvTranspose(features, (4, 4), strides=(2, 2), padding='SAME')``, computed as one 3x3 conv.

  A stride-2 transposed convolution gives each output phase (row parity, column parity) its own 2x2
  sub-kernel over a 3x3 input neighbourhood. So it equals a 3x3 'SAME' convolution to 4x the channels
  (each phase's taps placed in the 3x3 window, zeros elsewhere) followed by depth-to-space. Same
  parameters (a 4x4 kernel and a bias, Flax's names and initializers), same function; on XLA:CPU the
  gradient of the lhs-dilated transposed convolution was ~20x slower than this plain convolution's.
  """
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jnp.ndarray) -> jnp.ndarray:
    b, h, w, c = x_BxHxWxC.shape
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (4, 4, c, self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), jnp.float32)
    # lax.conv_transpose's SAME padding for k=4, s=2 puts pad_a=2 before the dilated input, so output
    # row 2m+a reads input row m+d through tap k where d = (a + k - 2) / 2 is an integer in {-1, 0, 1}.
    rows = [[None] * 3 for _ in range(2)]
    for a in range(2):
      for k in range(4):
        if (a + k - 2) % 2 == 0:
          rows[a][(a + k - 2) // 2 + 1] = k
    zeros = jnp.zeros((c, self.features), jnp.float32)
    window = jnp.stack([  # [3, 3, C, 2, 2, F]: window offset (dy, dx) -> phase (a, b)
        jnp.stack([
            jnp.stack([jnp.stack([kernel[rows[a][dy], rows[bb][dx]]
                                  if rows[a][dy] is not None and rows[bb][dx] is not None else zeros
                                  for bb in range(2)], axis=-2) for a in range(2)], axis=-3)
            for dx in range(3)]) for dy in range(3)])
    window = window.reshape(3, 3, c, 4 * self.features).astype(self.dtype)
    y = jax.lax.conv_general_dilated(x_BxHxWxC.astype(self.dtype), window, (1, 1), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    y = y.reshape(b, h, w, 2, 2, self.features).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(b, 2 * h, 2 * w, self.features) + bias.astype(y.dtype)


BOTTLENECKS = ('dense', 'conv')
NORMALIZE = ('none', 'image')
NORMALIZE_EPS = 0.02  # added to the per-image std: a flat image is not blown up to noise


class ConvAutoencoder(nn.Module):
  """Strided-conv encoder -> latent code -> mirrored decoder; output in [0, 1].

  Each entry of ``features`` is one encoder level: a 4x4 stride-2 convolution (halving H and W)
  followed by a 3x3 convolution, a leaky ReLU (slope 0.2) after each. The code is a vector of ``latent_dim``
  (``bottleneck='dense'``, the paper's Figure 3) or ``latent_dim`` channels at the bottom resolution
  (``'conv'``, a 1x1 convolution: a spatial code). The decoder mirrors the encoder with 4x4 stride-2
  transposed convolutions (``UpConv4x4``), and a final 3x3 convolution + sigmoid gives the reconstruction.

  ``normalize='image'``: the network sees each image standardized per channel, (x - mean) / (std + 0.02),
  and its linear head predicts the standardized image, mapped back as mean + (std + 0.02) * z (no
  sigmoid, not clipped). The code then has to hold the image's structure only, not its colour and
  contrast: a constant reconstruction is no longer the mean colour of the training set but the image's
  own mean, which the loss cannot settle on (measured on the embedded textures in the README).
  """
  features: Sequence[int] = (32, 64, 128, 256, 256)
  latent_dim: int = 500
  out_channels: int = 3
  dtype: Any = jnp.float32
  bottleneck: str = 'dense'
  normalize: str = 'none'

  def setup(self):
    if self.bottleneck not in BOTTLENECKS:
      raise ValueError(f'config.model.ae_bottleneck must be one of {BOTTLENECKS}, got {self.bottleneck!r}.')
    if self.normalize not in NORMALIZE:
      raise ValueError(f'config.model.ae_normalize must be one of {NORMALIZE}, got {self.normalize!r}.')
    self.down = [(nn.Conv(f, (4, 4), strides=(2, 2), padding='SAME', dtype=self.dtype),
                  nn.Conv(f, (3, 3), padding='SAME', dtype=self.dtype)) for f in self.features]
    if self.bottleneck == 'dense':
      self.to_latent = nn.Dense(self.latent_dim, dtype=self.dtype)
    else:
      self.to_latent = nn.Conv(self.latent_dim, (1, 1), dtype=self.dtype)
      self.from_latent_conv = nn.Conv(self.features[-1], (1, 1), dtype=self.dtype)
    self.up = [(UpConv4x4(f, dtype=self.dtype),
                nn.Conv(f, (3, 3), padding='SAME', dtype=self.dtype))
               for f in list(reversed(self.features))[1:] + [self.features[0]]]
    self.head = nn.Conv(self.out_channels, (3, 3), padding='SAME', dtype=self.dtype)

  @staticmethod
  def act(x):
    return nn.leaky_relu(x, 0.2)

  def _bottom_shape(self, h: int, w: int) -> tuple[int, int, int]:
    scale = 2 ** len(self.features)
    if h % scale or w % scale:
      raise ValueError(f'Autoencoder input {h}x{w} is not divisible by 2**len(ae_features) = {scale}: '
                       'change config.data.image_size or config.model.ae_features.')
    return h // scale, w // scale, self.features[-1]

  def encode(self, x_BxHxWxC: jnp.ndarray) -> jnp.ndarray:
    """The code: [B, latent_dim] ('dense') or [B, h, w, latent_dim] ('conv')."""
    x = x_BxHxWxC.astype(self.dtype)
    for strided, conv in self.down:
      x = self.act(strided(x))
      x = self.act(conv(x))
    return self.to_latent(x if self.bottleneck == 'conv' else x.reshape(x.shape[0], -1))

  def decode(self, z: jnp.ndarray, hw: tuple[int, int], raw: bool = False) -> jnp.ndarray:
    """The reconstruction in [0, 1] (sigmoid), or with ``raw`` the head's linear output."""
    bh, bw, bc = self._bottom_shape(*hw)
    if self.bottleneck == 'conv':
      x = self.act(self.from_latent_conv(z))
    else:
      x = self.from_latent(z, bh * bw * bc).reshape(-1, bh, bw, bc)
    for upconv, conv in self.up:
      x = self.act(upconv(x))
      x = self.act(conv(x))
    out = self.head(x).astype(jnp.float32)
    return out if raw else jax.nn.sigmoid(out)

  @nn.compact
  def from_latent(self, z_BxD: jnp.ndarray, size: int) -> jnp.ndarray:
    return self.act(nn.Dense(size, dtype=self.dtype, name='from_latent_dense')(z_BxD))

  def __call__(self, x_BxHxWxC: jnp.ndarray) -> jnp.ndarray:
    """Reconstruction of ``x`` (values in [0, 1]; about so with ``normalize='image'``), same shape, float32."""
    hw = x_BxHxWxC.shape[1:3]
    self._bottom_shape(*hw)
    if self.normalize == 'image':
      x = x_BxHxWxC.astype(jnp.float32)
      mean = x.mean(axis=(1, 2), keepdims=True)
      scale = x.std(axis=(1, 2), keepdims=True) + NORMALIZE_EPS
      return mean + scale * self.decode(self.encode((x - mean) / scale), hw, raw=True)
    return self.decode(self.encode(x_BxHxWxC), hw)
