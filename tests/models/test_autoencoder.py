"""semiseg/models/autoencoder.py against independent references: the paper's parameter count, Flax's
ConvTranspose, the standardization written out."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semiseg.models.autoencoder import ConvAutoencoder


def test_autoencoder_shapes_and_range():
  model = ConvAutoencoder(features=(4, 8), latent_dim=7)
  x = jax.random.uniform(jax.random.PRNGKey(0), (3, 16, 16, 3))
  p = model.init(jax.random.PRNGKey(1), x)
  y = model.apply(p, x)
  assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
  assert p['params']['to_latent']['kernel'].shape[-1] == 7
  with pytest.raises(ValueError, match='ae_features'):
    model.init(jax.random.PRNGKey(1), jnp.zeros((1, 18, 18, 3)))


def test_autoencoder_normalize_image_maps_the_standardized_output_back():
  """normalize='image': the network sees (x - mean) / (std + 0.02) per image and channel and its linear
  head's output z comes back as mean + (std + 0.02) * z. Checked by hand with numpy on the raw decode."""
  model = ConvAutoencoder(features=(4, 8), latent_dim=5, bottleneck='conv', normalize='image')
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 3)) * 0.3 + 0.5
  p = model.init(jax.random.PRNGKey(1), x)
  xn = np.asarray(x, np.float64)
  mean, scale = xn.mean(axis=(1, 2), keepdims=True), xn.std(axis=(1, 2), keepdims=True) + 0.02
  z = model.apply(p, jnp.asarray((xn - mean) / scale, jnp.float32), (16, 16), True,
                  method=lambda m, x, hw, raw: m.decode(m.encode(x), hw, raw=raw))
  np.testing.assert_allclose(np.asarray(model.apply(p, x)), mean + scale * np.asarray(z), atol=1e-5)
  # Brightness and contrast do not reach the code: a*x + b gives a*recon(x) + b.
  np.testing.assert_allclose(np.asarray(model.apply(p, 0.5 * x + 0.2)), 0.5 * np.asarray(model.apply(p, x)) + 0.2,
                             atol=2e-3)
  with pytest.raises(ValueError, match='ae_normalize'):
    ConvAutoencoder(features=(4, 8), latent_dim=5, normalize='batch').init(jax.random.PRNGKey(1), x)


def test_autoencoder_upconv_equals_conv_transpose_with_the_same_init():
  from semiseg.models.autoencoder import UpConv4x4
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7, 6))
  ours, ref = UpConv4x4(4), nn.ConvTranspose(4, (4, 4), strides=(2, 2), padding='SAME')
  p, p_ref = ours.init(jax.random.PRNGKey(1), x), ref.init(jax.random.PRNGKey(1), x)
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p_ref)):
    np.testing.assert_array_equal(a, b)  # same names, shapes, initializers: old checkpoints still load
  p = jax.tree.map(lambda a: jax.random.normal(jax.random.PRNGKey(2), a.shape), p)
  np.testing.assert_allclose(ours.apply(p, x), ref.apply(p, x), atol=1e-5)
  g = jax.grad(lambda q: (ours.apply(q, x) ** 2).sum())(p)
  g_ref = jax.grad(lambda q: (ref.apply(q, x) ** 2).sum())(p)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_autoencoder_parameter_count_at_the_papers_settings():
  params = jax.eval_shape(ConvAutoencoder().init, jax.random.PRNGKey(0), jnp.zeros((1, 256, 256, 3)))
  assert sum(x.size for x in jax.tree.leaves(params)) == 22_061_335
