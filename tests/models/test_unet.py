"""semiseg/models/unet.py against independent references: the paper's parameter count, numpy, Flax's own layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semiseg.models.unet import DoubleConv, UNet, UpConv2x2, max_pool_2x2


def test_unet_has_the_papers_parameter_count():
  params = jax.eval_shape(UNet(features=64, depth=4).init, jax.random.PRNGKey(0), jnp.zeros((1, 256, 256, 6)))
  assert sum(x.size for x in jax.tree.leaves(params)) == 31_033_473


def test_double_conv_with_group_norm_matches_numpy():
  """norm='group': conv -> GroupNorm (8 channels a group, per image, eps 1e-6, learned scale and bias)
  -> ReLU, twice. Checked against scipy's correlation and numpy's group statistics; the plain block
  keeps the old parameter names, so the paper U-Net's checkpoints still load."""
  from scipy.signal import correlate
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (2, 6, 5, 3)), np.float64)
  block = DoubleConv(16, norm='group')
  p = block.init(jax.random.PRNGKey(1), jnp.asarray(x, jnp.float32))
  p = jax.tree.map(lambda a: jax.random.normal(jax.random.PRNGKey(2), a.shape) * 0.5 + (a.ndim == 1), p)
  q = jax.tree.map(lambda a: np.asarray(a, np.float64), p['params'])
  assert set(q) == {'Conv_0', 'Conv_1', 'GroupNorm_0', 'GroupNorm_1'}
  assert set(DoubleConv(16).init(jax.random.PRNGKey(1), jnp.asarray(x, jnp.float32))['params']) == {'Conv_0', 'Conv_1'}

  def conv(h, kernel, bias):  # 'SAME' 3x3 cross-correlation, one image at a time
    out = np.zeros(h.shape[:3] + (kernel.shape[-1],))
    for b in range(h.shape[0]):
      for o in range(kernel.shape[-1]):
        out[b, :, :, o] = correlate(h[b], kernel[:, :, :, o], mode='same')[:, :, h.shape[-1] // 2]
    return out + bias

  def group_norm(h, scale, bias, groups):
    b, hh, ww, c = h.shape
    g = h.reshape(b, hh, ww, groups, c // groups)
    g = (g - g.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(g.var(axis=(1, 2, 4), keepdims=True) + 1e-6)
    return g.reshape(h.shape) * scale + bias

  h = x
  for i in range(2):
    h = conv(h, q[f'Conv_{i}']['kernel'], q[f'Conv_{i}']['bias'])
    h = np.maximum(group_norm(h, q[f'GroupNorm_{i}']['scale'], q[f'GroupNorm_{i}']['bias'], groups=2), 0)
  np.testing.assert_allclose(np.asarray(block.apply(p, jnp.asarray(x, jnp.float32))), h, rtol=1e-4, atol=1e-4)


def test_unet_rejects_an_unknown_norm():
  with pytest.raises(ValueError, match='config.model.unet_norm'):
    UNet(features=4, depth=1, norm='batch').init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))


def test_upconv_equals_conv_transpose():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7, 6))
  ours = UpConv2x2(4)
  p = ours.init(jax.random.PRNGKey(1), x)
  p = jax.tree.map(lambda a: jax.random.normal(jax.random.PRNGKey(2), a.shape), p)
  w = p['params']['kernel_1x1']['kernel'][0, 0]  # [Cin, 4*Cout] ordered (dy, dx, Cout)
  # -> [dy, dx, Cin, Cout]; lax.conv_transpose (Flax's default) applies the kernel spatially flipped.
  kernel = w.reshape(6, 2, 2, 4).transpose(1, 2, 0, 3)[::-1, ::-1]
  ref = nn.ConvTranspose(4, (2, 2), strides=(2, 2), padding='VALID')
  ref_params = {'params': {'kernel': kernel, 'bias': p['params']['bias']}}
  np.testing.assert_allclose(ours.apply(p, x), ref.apply(ref_params, x), atol=1e-5)
  assert sum(a.size for a in jax.tree.leaves(p)) == sum(a.size for a in jax.tree.leaves(ref_params))


def test_max_pool_equals_flax():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 6, 3))
  np.testing.assert_array_equal(max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2)))


def test_unet_rejects_sizes_not_divisible_by_depth():
  with pytest.raises(ValueError, match='image_size'):
    UNet(features=4, depth=3).init(jax.random.PRNGKey(0), jnp.zeros((1, 20, 20, 3)))
