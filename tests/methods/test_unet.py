"""unet: the head's 1 % prior and the image-size check, against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semiseg.methods import unet
from tests.methods.tiny import SIZE, make, tiny_config


def test_a_fresh_unet_with_a_silent_head_predicts_the_one_percent_prior():
  """The head's bias starts at logit(0.01) = log(0.01 / 0.99) = -4.595: with the head's kernel zeroed the
  score map is 0.01 at every pixel, whatever the image."""
  m, state, _ = make('unet')
  head = state.params['params']['head']
  np.testing.assert_allclose(np.asarray(head['bias']), np.log(0.01 / 0.99), rtol=1e-6)
  params = jax.tree.map(jnp.asarray, state.params)
  params['params']['head'] = {'bias': head['bias'], 'kernel': jnp.zeros_like(head['kernel'])}
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, SIZE, SIZE, 3))
  probs = np.asarray(jax.jit(m.score_map)(state.replace(params=params), x))
  assert probs.shape == (2, SIZE, SIZE)
  np.testing.assert_allclose(probs, 0.01, rtol=1e-5)


def test_the_image_side_must_halve_cleanly_through_the_depth():
  config = tiny_config('unet')
  depth = config.model.unet_depth
  config.data.image_size = 3 * 2 ** depth  # halves depth times: 3 x 2**depth -> 3
  unet.validate(config)
  config.data.image_size = 3 * 2 ** depth + 2 ** (depth - 1)  # the last halving would leave a half pixel
  want = rf'image_size={config.data.image_size} .*2\*\*config\.model\.unet_depth={2 ** depth}'
  with pytest.raises(ValueError, match=want):
    unet.validate(config)
