"""pca: the closed-form fit and its error map against numpy's SVD."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from semiseg import augment
from semiseg.methods import create_method
from tests.methods.tiny import SIZE, ctx, tiny_config


def pca_images(n=12, size=SIZE, seed=0):
  """uint8 images with a few strong shared patterns plus noise, like a product photographed n times."""
  rng = np.random.default_rng(seed)
  patterns = rng.random((4, size * size * 3))
  coef = rng.normal(size=(n, 4)) * np.array([1.0, 0.5, 0.25, 0.1])
  x = 0.5 + 0.15 * coef @ (patterns - 0.5) + 0.03 * rng.normal(size=(n, size * size * 3))
  return (np.clip(x, 0, 1) * 255).round().astype(np.uint8).reshape(n, size, size, 3)


@functools.lru_cache(maxsize=None)
def fitted_pca(num_components, variance=0.95, texture=False):
  m = create_method(tiny_config('pca', **{'pca.num_components': num_components, 'pca.variance': variance}),
                    ctx(texture))
  images = pca_images(12, 2 * SIZE if texture else SIZE)
  state = jax.jit(m.solve)(m.init(jax.random.PRNGKey(0)), jnp.asarray(images))
  return m, state, images


def numpy_pca(data_NxD, k):
  mean = data_NxD.mean(0)
  _, s, vt = np.linalg.svd(data_NxD - mean, full_matrices=False)
  return mean, vt[:k], s


def test_pca_with_all_components_reconstructs_its_training_images():
  m, state, images = fitted_pca(12)
  assert int(state.step) == 1
  x = images.astype(np.float32) / 255
  np.testing.assert_allclose(m.reconstruct(state, jnp.asarray(x)), x, atol=1e-4)


def test_pca_error_map_equals_numpy_svd():
  k = 3
  m, state, images = fitted_pca(k)
  x = images.reshape(len(images), -1).astype(np.float64) / 255
  mean, vt, _ = numpy_pca(x, k)
  assert tiny_config('pca').model.diff_channels == 'max'  # the CPU preset's channel reduction
  for probe in (x, pca_images(5, seed=1).reshape(5, -1).astype(np.float64) / 255):  # train and unseen
    recon = np.clip((probe - mean) @ vt.T @ vt + mean, 0, 1)
    diff = np.abs(probe - recon).reshape(-1, SIZE, SIZE, 3)
    expected = diff.max(-1)
    got = np.asarray(m.score_map(state, jnp.asarray(probe.reshape(-1, SIZE, SIZE, 3), jnp.float32)))
    np.testing.assert_allclose(got, expected, atol=2e-5)
    assert got.min() >= 0 and got.max() <= 1


def test_pca_variance_keeps_the_fewest_components_reaching_it():
  m, state, images = fitted_pca(0, 0.9)
  _, _, s = numpy_pca(images.reshape(len(images), -1).astype(np.float64) / 255, 1)
  expected = int(np.searchsorted(np.cumsum(s ** 2) / np.sum(s ** 2), 0.9) + 1)
  kept = int((np.abs(np.asarray(state.params['components'])).sum(1) > 0).sum())
  assert kept == expected and 1 < kept < 12
  c = np.asarray(state.params['components'])[:kept]
  np.testing.assert_allclose(c @ c.T, np.eye(kept), atol=1e-5)


def test_pca_textures_fit_on_tiles_like_the_tiled_prediction():
  _, state, images = fitted_pca(4, texture=True)
  tiles = augment.to_tiles(jnp.asarray(images, jnp.float32) / 255, SIZE)
  mean, vt, _ = numpy_pca(np.asarray(tiles, np.float64).reshape(len(tiles), -1), 4)
  np.testing.assert_allclose(state.params['mean'], mean, atol=1e-5)
  # Same subspace (the signs of singular vectors are arbitrary): equal projectors.
  c = np.asarray(state.params['components'], np.float64)
  np.testing.assert_allclose(c.T @ c, vt.T @ vt, atol=1e-4)
