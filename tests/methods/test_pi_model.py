"""pi_model: one forward pass over the labeled images and both views, checked with two equal views by hand."""

import jax
import jax.numpy as jnp
import numpy as np

from semiseg.methods import consistency, unet
from tests.methods.tiny import fixed_batch, make


def test_two_equal_views_agree_exactly_and_the_loss_is_numpys_cross_entropy(monkeypatch):
  """Given the same view twice (identity warps), the two halves of the step's forward pass are equal: the
  consistency is 0 and the loss is the labeled cross-entropy alone, numpy's -y log s(z) - (1 - y) log(1 - s(z))
  on the U-Net's logits. The head is made steep and unbiased first, so that the U-Net predicts over the whole
  range instead of its 1 % prior (where any two views agree to ~1e-4)."""
  m, state, _ = make('pi_model')
  head = state.params['params']['head']
  params = jax.tree.map(jnp.asarray, state.params)
  params['params']['head'] = {'bias': jnp.zeros_like(head['bias']), 'kernel': 5.0 * head['kernel']}
  state = state.replace(params=params)

  def same_view_twice(key, images_BxHxWx3, spec):
    del key, spec
    eye = jnp.broadcast_to(jnp.eye(3, dtype=jnp.float32), (images_BxHxWx3.shape[0], 3, 3))
    return images_BxHxWx3, images_BxHxWx3, eye, eye
  monkeypatch.setattr(consistency, 'two_views', same_view_twice)
  batch = fixed_batch(2)
  _, metrics = jax.jit(lambda s, b: m.train_step(s, b))(state, batch)  # a fresh trace: sees the patch
  kw = m.train_step.keywords
  images, masks = unet.augmented_labeled(state, batch, kw['spec'])  # the labeled warp, as the step draws it
  z = np.asarray(kw['model'].apply(state.params, images), np.float64)
  y = np.asarray(masks, np.float64)
  s = 1.0 / (1.0 + np.exp(-z))
  assert 0.05 < s.std(), s.std()  # spread: the views carry information to disagree on
  ce = np.mean(-y * np.log(s) - (1.0 - y) * np.log(1.0 - s))
  assert float(metrics['consistency']) < 1e-12
  np.testing.assert_allclose(float(metrics['ce']), ce, rtol=1e-5)
  np.testing.assert_allclose(float(metrics['loss']), ce, rtol=1e-5)
