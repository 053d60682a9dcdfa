"""semiseg/models/dcgan.py against a reference DCGAN generator written with Flax's ConvTranspose."""

import flax.linen as nn
import jax
import numpy as np


def test_dcgan_generator_equals_the_transposed_conv_dcgan():
  """The generator's UpConv4x4 layers compute Radford et al.'s stride-2 transposed convs: a reference
  generator written with nn.ConvTranspose takes the same parameters and gives the same images."""
  from semiseg.models.dcgan import Generator

  class Reference(nn.Module):
    features: tuple = (4, 8, 8)

    @nn.compact
    def __call__(self, z):
      s = 16 // 2 ** len(self.features)
      x = nn.Dense(s * s * self.features[-1])(z)
      x = nn.relu(nn.LayerNorm()(x.reshape(-1, s, s, self.features[-1])))
      for f in list(reversed(self.features))[1:]:
        x = nn.relu(nn.LayerNorm()(nn.ConvTranspose(f, (4, 4), strides=(2, 2), padding='SAME')(x)))
      return jax.nn.sigmoid(nn.ConvTranspose(3, (4, 4), strides=(2, 2), padding='SAME')(x))

  z = jax.random.normal(jax.random.PRNGKey(0), (3, 6))
  ours, ref = Generator(features=(4, 8, 8), image_size=16), Reference()
  p, p_ref = ours.init(jax.random.PRNGKey(1), z), ref.init(jax.random.PRNGKey(1), z)
  assert jax.tree.structure(p) == jax.tree.structure(p_ref)  # earlier checkpoints still load
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p_ref)):
    np.testing.assert_array_equal(a, b)
  p = jax.tree.map(lambda a: 0.5 * jax.random.normal(jax.random.PRNGKey(2), a.shape), p)
  np.testing.assert_allclose(ours.apply(p, z), ref.apply(p, z), atol=1e-5)
