"""The analytic FLOP count: a tiny network counted by hand and against XLA's count of its layers alone."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from semiseg.bench import flops, layers
from semiseg.models.autoencoder import UpConv4x4


class Tiny(nn.Module):
  """3x3 'SAME' conv -> 2x2 stride-2 conv -> 4x4 stride-2 up-conv -> dense, on [2, 8, 6, 3]."""
  upconv: str = 'UpConv4x4'  # or 'ConvTranspose': the layer UpConv4x4 stands for
  layers_only: bool = False  # no biases, no activation

  @nn.compact
  def __call__(self, x):
    bias = not self.layers_only
    x = nn.Conv(4, (3, 3), padding='SAME', use_bias=bias)(x)
    x = x if self.layers_only else nn.relu(x)
    x = nn.Conv(8, (2, 2), strides=(2, 2), padding='VALID', use_bias=bias)(x)
    if self.upconv == 'UpConv4x4':
      x = UpConv4x4(5)(x)
    else:
      x = nn.ConvTranspose(5, (4, 4), strides=(2, 2), padding='SAME', use_bias=bias)(x)
    return nn.Dense(7, use_bias=bias)(x.reshape(x.shape[0], -1))


# Multiply-adds by hand, batch B = 2. Along one spatial dimension of n inputs, (output, tap) pairs that
# read an input: a 3x3 'SAME' conv 3n - 2 (the first and last output lose one tap each to the zero
# padding); a 2x2 stride-2 'VALID' conv n (every input read once); a 4x4 stride-2 'SAME' transposed
# conv 4n - 2 (each of the 2n outputs reads 2 inputs, the first and last only 1).
B = 2
CONV = B * (3 * 8 - 2) * (3 * 6 - 2) * 3 * 4  # 8x6, 3 -> 4 channels: 8448
STRIDED = B * 8 * 6 * 4 * 8  # 8x6 -> 4x3, 4 -> 8 channels: 3072
UPCONV = B * (4 * 4 - 2) * (4 * 3 - 2) * 8 * 5  # 4x3 -> 8x6, 8 -> 5 channels: 11200
UPCONV_AS_RUN = B * (3 * 4 - 2) * (3 * 3 - 2) * 8 * 20  # UpConv4x4's 3x3 conv to 4 x 5 channels at 4x3: 22400
DENSE = B * 240 * 7  # 8 * 6 * 5 = 240 -> 7: 3360
FORWARD = 2 * (CONV + STRIDED + UPCONV + DENSE)  # 2 FLOPs per multiply-add: 52160
# Backward: a weight gradient for every layer, an input gradient for all but the first (its input is
# the data), each with its forward's multiply-adds.
TRAIN = FORWARD + (FORWARD - 2 * CONV) + FORWARD  # 139584


def _abstract_tiny(upconv, layers_only=False):
  model = Tiny(upconv, layers_only)
  x = jax.ShapeDtypeStruct((2, 8, 6, 3), jnp.float32)
  return model, jax.eval_shape(model.init, jax.random.PRNGKey(0), x), x


@pytest.mark.parametrize('upconv', ['UpConv4x4', 'ConvTranspose'])
def test_hand_counted_network(upconv):
  model, params, x = _abstract_tiny(upconv)
  count = flops.count(model.apply, params, x, wrt=0)
  assert [l.macs for l in count.layers] == [CONV, STRIDED, UPCONV, DENSE]
  assert [l.input_grad for l in count.layers] == [False, True, True, True]
  assert all(l.weight_grad for l in count.layers)
  assert count.forward() == FORWARD == 52160
  assert count.train() == TRAIN == 139584
  assert count.forward(implemented=True) == FORWARD + 2 * (UPCONV_AS_RUN - UPCONV if upconv == 'UpConv4x4' else 0)
  inference = flops.count(model.apply, params, x)  # nothing trained: no gradients
  assert inference.train() == inference.forward() == FORWARD


def test_layers_alone_match_xla_exactly():
  """Without biases and activations a program is its layers: XLA counts the same FLOPs, forward and
  forward + backward (so it also leaves out padding taps and the holes of a transposed convolution)."""
  model, abstract, x = _abstract_tiny('ConvTranspose', layers_only=True)
  params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), abstract)
  images = jnp.ones(x.shape)
  cotangent = jnp.ones((2, 7))

  def forward_backward(params, images, cotangent):
    out, vjp = jax.vjp(lambda p: model.apply(p, images), params)
    return out, vjp(cotangent)
  xla_forward = jax.jit(model.apply).lower(params, images).compile().cost_analysis()['flops']
  xla_train = jax.jit(forward_backward).lower(params, images, cotangent).compile().cost_analysis()['flops']
  assert (xla_forward, xla_train) == (FORWARD, TRAIN)


def test_frozen_networks_and_stop_gradient_have_no_backward():
  model, params, x = _abstract_tiny('ConvTranspose')
  dense = nn.Dense(3)
  dense_params = jax.eval_shape(dense.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((2, 7), jnp.float32))

  def two_networks(trained, frozen, images):  # a frozen feature extractor feeding a trained head
    return dense.apply(trained, model.apply(frozen, images))
  count = flops.count(two_networks, dense_params, params, x, wrt=0)
  assert [(l.input_grad, l.weight_grad) for l in count.layers] == [(False, False)] * 4 + [(False, True)]
  assert count.train() == FORWARD + 2 * 2 * (B * 7 * 3)  # + the dense head's forward and weight gradient

  def cut(trained, images):  # both trained, but no gradient flows back through stop_gradient
    return dense.apply(trained[1], jax.lax.stop_gradient(model.apply(trained[0], images)))
  count = flops.count(cut, (params, dense_params), x, wrt=0)
  assert [(l.input_grad, l.weight_grad) for l in count.layers] == [(False, False)] * 4 + [(False, True)]


def test_layers_in_a_loop_are_refused_not_undercounted():
  kernel = jax.ShapeDtypeStruct((3, 3, 4, 4), jnp.float32)

  def looped(kernel, x):
    return jax.lax.scan(lambda h, _: (layers._conv3x3(h, kernel), None), x, None, length=3)[0]
  with pytest.raises(NotImplementedError, match='scan'):
    flops.count(looped, kernel, jax.ShapeDtypeStruct((1, 8, 8, 4), jnp.float32), wrt=0)
