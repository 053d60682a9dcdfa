"""The standard U-Net of the paper (section 3.2; Ronneberger et al. 2015) as a Flax Linen module."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


def max_pool_2x2(x_BxHxWxC: jnp.ndarray) -> jnp.ndarray:
  """2x2 max pooling with stride 2, written as reshape + max.

  Same values as ``nn.max_pool(x, (2, 2), (2, 2))``; XLA:CPU lowers the reshape form to a plain
  reduction whose gradient is a cheap select instead of a windowed scatter.
  """
  b, h, w, c = x_BxHxWxC.shape
  return x_BxHxWxC.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class UpConv2x2(nn.Module):
  """The 2x2, stride-2 "up-convolution": ``nn.ConvTranspose(features, (2, 2), strides=(2, 2))``.

  A stride-2 transposed convolution with a 2x2 kernel writes each input pixel to its own disjoint 2x2
  output block, so it equals a bias-free 1x1 convolution to 4x the channels followed by depth-to-space
  and one bias per output channel: same function, same parameter count (4*Cin*Cout + Cout), and a
  plain matrix product forward and backward instead of a strided transposed convolution.
  """
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jnp.ndarray) -> jnp.ndarray:
    b, h, w, _ = x_BxHxWxC.shape
    y = nn.Conv(4 * self.features, (1, 1), use_bias=False, dtype=self.dtype, name='kernel_1x1')(x_BxHxWxC)
    y = y.reshape(b, h, w, 2, 2, self.features).transpose(0, 1, 3, 2, 4, 5)
    y = y.reshape(b, 2 * h, 2 * w, self.features)
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), jnp.float32)
    return y + bias.astype(y.dtype)


NORMS = ('none', 'group')


def group_count(features: int) -> int:
  """Groups of a GroupNorm over ``features`` channels: 8 channels a group (Wu and He 2018 found 8-16
  channels a group as good as 32 groups), at least one group."""
  return max(1, features // 8)


class DoubleConv(nn.Module):
  """Two padded 3x3 convolutions, each followed by a ReLU; with ``norm='group'`` a GroupNorm sits
  between each convolution and its ReLU (Conv -> GN -> ReLU, as BatchNorm does in common U-Nets)."""
  features: int
  dtype: Any = jnp.float32
  norm: str = 'none'

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    for i in range(2):
      x = nn.Conv(self.features, (3, 3), padding='SAME', dtype=self.dtype, name=f'Conv_{i}')(x)
      if self.norm == 'group':
        x = nn.GroupNorm(num_groups=group_count(self.features), dtype=self.dtype, name=f'GroupNorm_{i}')(x)
      x = nn.relu(x)
    return x


class UNet(nn.Module):
  """U-Net: ``depth`` poolings, channels doubling from ``features``; one logit per pixel.

  With 6 input channels, features=64 and depth=4 it has 31,033,473 parameters.
  """
  features: int = 64
  depth: int = 4
  num_outputs: int = 1
  dtype: Any = jnp.float32
  # Initial bias of the 1x1 head: log(p / (1 - p)) starts the network at a defect-pixel prior p
  # instead of 0.5 (Lin et al. 2017, RetinaNet); 0.0 is the plain zero init.
  head_bias_init: float = 0.0
  # 'none': the paper's plain convolutions; 'group': GroupNorm after every 3x3 convolution (no batch
  # statistics, so the function of one image does not depend on the rest of its batch).
  norm: str = 'none'

  @nn.compact
  def __call__(self, x_BxHxWxC: jnp.ndarray) -> jnp.ndarray:
    """Returns logits ``[B, H, W, num_outputs]`` in float32; H and W must divide by 2**depth."""
    _, h, w, _ = x_BxHxWxC.shape
    if h % (2 ** self.depth) or w % (2 ** self.depth):
      raise ValueError(f'U-Net input {h}x{w} is not divisible by 2**depth = {2 ** self.depth}: '
                       'set config.data.image_size to a multiple of it or lower config.model.unet_depth.')
    if self.norm not in NORMS:
      raise ValueError(f'config.model.unet_norm must be one of {NORMS}, got {self.norm!r}.')
    x = x_BxHxWxC.astype(self.dtype)
    skips = []
    for level in range(self.depth):
      x = DoubleConv(self.features * 2 ** level, self.dtype, self.norm, name=f'down_{level}')(x)
      skips.append(x)
      x = max_pool_2x2(x)
    x = DoubleConv(self.features * 2 ** self.depth, self.dtype, self.norm, name='bottom')(x)
    for level in reversed(range(self.depth)):
      x = UpConv2x2(self.features * 2 ** level, self.dtype, name=f'upconv_{level}')(x)
      x = jnp.concatenate([skips[level], x.astype(skips[level].dtype)], axis=-1)
      x = DoubleConv(self.features * 2 ** level, self.dtype, self.norm, name=f'up_{level}')(x)
    logits = nn.Conv(self.num_outputs, (1, 1), dtype=self.dtype, name='head',
                     bias_init=nn.initializers.constant(self.head_bias_init))(x)
    return logits.astype(jnp.float32)
