"""The autoencoder method's score map against scipy's Gaussian blur."""

import functools

import jax
import numpy as np
import pytest
import scipy.ndimage

from semiseg.methods import autoencoder
from tests.methods.tiny import SIZE, make, tiny_config


@pytest.mark.parametrize('channels', ['mean', 'max'])
def test_ae_score_map_is_channel_reduced_abs_difference(channels):
  """The AE's score: |I - AE(I)| blurred by config.model.diff_blur px (scipy's Gaussian, edges
  repeated, 3 sigma), then its channel mean or max (config.model.diff_channels)."""
  m, state, _ = make('ae')
  sigma = tiny_config('ae').model.diff_blur
  assert sigma > 0  # the CPU preset blurs D
  x = jax.random.uniform(jax.random.PRNGKey(3), (2, SIZE, SIZE, 3))
  raw = np.abs(np.asarray(x) - np.asarray(m.reconstruct(state, x)))
  blurred = scipy.ndimage.gaussian_filter(raw, (0, sigma, sigma, 0), mode='nearest', truncate=3.0)
  want = blurred.max(-1) if channels == 'max' else blurred.mean(-1)
  score_map = functools.partial(autoencoder.score_map, model=autoencoder.create_model(tiny_config('ae')),
                                sigma=sigma, channels=channels)
  np.testing.assert_allclose(score_map(state, x), want, atol=1e-6)
  if channels == tiny_config('ae').model.diff_channels:  # the method's score map follows the config
    np.testing.assert_allclose(m.score_map(state, x), want, atol=1e-6)
