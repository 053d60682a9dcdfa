"""The PyTorch references: semiseg's parameter counts, and the standardized AE's invariance."""

import jax
import pytest


def test_torch_reference_has_the_same_parameter_count():
  torch_reference = pytest.importorskip('semiseg.bench.torch_reference')
  from semiseg.models.autoencoder import ConvAutoencoder
  from semiseg.models.unet import UNet
  import jax.numpy as jnp

  def count(model, shape):
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(shape))
    return sum(x.size for x in jax.tree.leaves(params))
  assert torch_reference.count_params(torch_reference.UNet(6, 8, 3)) == count(UNet(8, 3), (1, 32, 32, 6))
  assert (torch_reference.count_params(torch_reference.UNet(6, 8, 3, norm='group'))
          == count(UNet(8, 3, norm='group'), (1, 32, 32, 6)))
  assert (torch_reference.count_params(torch_reference.ConvAutoencoder((4, 8), 7, 32))
          == count(ConvAutoencoder((4, 8), 7), (1, 32, 32, 3)))
  # The CPU config's AE: a 1x1 conv code on per-image standardized inputs.
  spatial = torch_reference.ConvAutoencoder((4, 8), 7, 32, bottleneck='conv', normalize='image')
  assert (torch_reference.count_params(spatial)
          == count(ConvAutoencoder((4, 8), 7, bottleneck='conv', normalize='image'), (1, 32, 32, 3)))
  # As semiseg's (tests/models): brightness and contrast do not reach the code, a*x + b -> a*AE(x) + b.
  import torch
  x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.3 + 0.5
  with torch.no_grad():
    torch.testing.assert_close(spatial(0.5 * x + 0.2), 0.5 * spatial(x) + 0.2, atol=2e-3, rtol=0)
