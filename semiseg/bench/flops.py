"""FLOPs of a workload counted from its network's layers (convolutions, matrix products), forward and backward.

Convention:
- 2 FLOPs per multiply-add. A convolution does (output elements) x (input channels per group) x (its
  kernel taps that land on an input value) multiply-adds: taps on zero padding, or between the inputs
  of a transposed (input-dilated) convolution, are not counted; XLA's cost analysis counts the same
  way. A matrix product does (output elements) x (contraction size).
- Backward: a layer whose input (the data operand) depends on the trained parameters has an input
  gradient, one whose kernel (the other operand) depends on them a weight gradient, each with exactly
  its forward's multiply-adds (every product of the forward has one counterpart in each gradient);
  neither when its output reaches the result only through ``stop_gradient``. So the first layer,
  whose input is the data, has no input gradient, and a frozen network (the AE inside ``ae_unet``)
  counts its forward only.
- Nothing else counts: bias adds, activations, pooling, concatenation, the loss, the optimizer and the
  augmentation are elementwise or data movement (XLA counts 0.2-5 % more than the layers for these
  networks at the benchmark's shapes, 6-7 % at the tests' tiny ones).
- The network's math, not its implementation: a module that computes a layer another way counts as the
  layer it stands for (``NETWORK_EQUIVALENTS``): ``UpConv4x4`` (a 3x3 convolution to 4x the channels +
  depth-to-space, 2.25x the multiply-adds) counts as the 4x4 stride-2 transposed convolution it equals,
  the numerator PyTorch's ``ConvTranspose2d`` has too.

Shapes come from tracing the workload itself (``jax.make_jaxpr``; every ``conv_general_dilated`` and
``dot_general`` is a layer, and which operands depend on the trained parameters is followed through
the program), so a changed architecture is counted as it is.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from jax.extend import core as jex_core

from semiseg.models.autoencoder import UpConv4x4

# Modules whose implementation differs from the layer they stand for: module -> that layer (a Flax module).
NETWORK_EQUIVALENTS: dict[type, Callable[[Any], nn.Module]] = {
    UpConv4x4: lambda m: nn.ConvTranspose(m.features, (4, 4), strides=(2, 2), padding='SAME', dtype=m.dtype),
}
LAYER_PRIMITIVES = ('conv_general_dilated', 'dot_general')
# Primitives that call a sub-program once with the same operands (the rest of the program flows through).
_CALLS = ('pjit', 'jit', 'closed_call', 'core_call', 'custom_jvp_call', 'custom_vjp_call', 'remat',
          'checkpoint')
_TAG = 'flops_equivalent_'


@dataclasses.dataclass(frozen=True)
class Layer:
  """One convolution or matrix product of the network, with what the backward pass does for it."""
  name: str  # the module path (the equation's name stack)
  primitive: str
  lhs_shape: tuple[int, ...]
  rhs_shape: tuple[int, ...]
  macs: int  # multiply-adds of the layer the network means (see NETWORK_EQUIVALENTS)
  implemented_macs: int  # multiply-adds of the operation the program runs
  input_grad: bool  # the data operand depends on the trained parameters
  weight_grad: bool  # the kernel operand depends on the trained parameters


@dataclasses.dataclass(frozen=True)
class Flops:
  """A workload's layers; FLOP totals of the network's math (``implemented=True``: of the program's)."""
  layers: tuple[Layer, ...]

  def _sum(self, which: Callable[[Layer], bool], implemented: bool) -> float:
    return 2.0 * sum(l.implemented_macs if implemented else l.macs for l in self.layers if which(l))

  def forward(self, implemented: bool = False) -> float:
    return self._sum(lambda l: True, implemented)

  def input_grad(self, implemented: bool = False) -> float:
    return self._sum(lambda l: l.input_grad, implemented)

  def weight_grad(self, implemented: bool = False) -> float:
    return self._sum(lambda l: l.weight_grad, implemented)

  def train(self, implemented: bool = False) -> float:
    """Forward + input gradients + weight gradients."""
    return self.forward(implemented) + self.input_grad(implemented) + self.weight_grad(implemented)


def valid_taps(n: int, k: int, m: int, stride: int, pad_lo: int, lhs_dilation: int = 1,
               rhs_dilation: int = 1) -> int:
  """(output position, kernel tap) pairs along one spatial dimension that read an input value.

  ``n`` inputs (dilated by ``lhs_dilation``, padded by ``pad_lo`` in front), kernel ``k`` (dilated by
  ``rhs_dilation``), ``m`` outputs at ``stride``: output ``o``'s tap ``j`` reads position
  ``o * stride + j * rhs_dilation - pad_lo`` of the dilated input, an input value when it is inside
  and on a multiple of ``lhs_dilation``.
  """
  q = np.arange(m)[:, None] * stride + np.arange(k)[None, :] * rhs_dilation - pad_lo
  return int(((q >= 0) & (q <= (n - 1) * lhs_dilation) & (q % lhs_dilation == 0)).sum())


def _macs(eqn) -> int:
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  out = eqn.outvars[0].aval.shape
  if eqn.primitive.name == 'dot_general':
    (lhs_contract, _), _ = eqn.params['dimension_numbers']
    return int(np.prod(out, dtype=np.int64)) * int(np.prod([lhs[d] for d in lhs_contract], dtype=np.int64))
  p, dn = eqn.params, eqn.params['dimension_numbers']
  taps = 1
  for d, (lo, _) in enumerate(p['padding']):
    taps *= valid_taps(lhs[dn.lhs_spec[2 + d]], rhs[dn.rhs_spec[2 + d]], out[dn.out_spec[2 + d]],
                       p['window_strides'][d], lo, p['lhs_dilation'][d], p['rhs_dilation'][d])
  # Output batch x output features x input features per group x valid taps.
  return out[dn.out_spec[0]] * out[dn.out_spec[1]] * rhs[dn.rhs_spec[1]] * taps


def _call_jaxpr(eqn):
  """The sub-program of an equation that calls one with its own operands (jit, custom_jvp, ...), else None."""
  subs = list(jex_core.jaxprs_in_params(eqn.params))
  if eqn.primitive.name in _CALLS and subs and len(subs[0].invars) == len(eqn.invars):
    return subs[0]
  return None


def _dependence(jaxpr, dependent: list[bool]) -> dict:
  """var -> whether it depends on the trained inputs (``dependent`` marks ``jaxpr.invars``)."""
  dep = dict(zip(jaxpr.invars, dependent))
  for eqn in jaxpr.eqns:
    ins = [_is(dep, v) for v in eqn.invars]
    sub = _call_jaxpr(eqn)
    if eqn.primitive.name == 'stop_gradient':
      outs = [False] * len(eqn.outvars)
    elif sub is not None:
      inner = _dependence(sub, ins)
      outs = [_is(inner, v) for v in sub.outvars]
    else:
      outs = [any(ins)] * len(eqn.outvars)
    dep.update(zip(eqn.outvars, outs))
  return dep


def _is(flags: dict, v) -> bool:
  return not isinstance(v, jex_core.Literal) and flags.get(v, False)


def _walk(jaxpr, dependent: list[bool], live_out: list[bool], equivalents: dict[str, int],
          layers: list[Layer]) -> list[bool]:
  """Appends the layers of ``jaxpr`` to ``layers``; returns which inputs a gradient reaches.

  A layer's operand has a gradient when it depends on the trained inputs (``dependent`` marks
  ``jaxpr.invars``) and the layer's output reaches a differentiated output (``live_out`` marks
  ``jaxpr.outvars``) other than through ``stop_gradient``.
  """
  dep = _dependence(jaxpr, dependent)
  live = {v: l for v, l in zip(jaxpr.outvars, live_out) if not isinstance(v, jex_core.Literal)}
  found: list[list[Layer]] = []  # per equation, last equation first
  for eqn in reversed(jaxpr.eqns):
    name, grad = eqn.primitive.name, any(_is(live, v) for v in eqn.outvars)
    ins_dep = [_is(dep, v) for v in eqn.invars]
    sub = _call_jaxpr(eqn)
    here: list[Layer] = []
    ins_live = [grad] * len(eqn.invars)
    if name in LAYER_PRIMITIVES:
      macs = _macs(eqn)
      scope = str(eqn.source_info.name_stack).split('/')
      tag = next((part for part in scope if part.startswith(_TAG)), None)
      here.append(Layer(name='/'.join(p for p in scope if not p.startswith(_TAG)), primitive=name,
                        lhs_shape=tuple(eqn.invars[0].aval.shape), rhs_shape=tuple(eqn.invars[1].aval.shape),
                        macs=equivalents[tag] if tag else macs, implemented_macs=macs,
                        input_grad=grad and ins_dep[0], weight_grad=grad and ins_dep[1]))
    elif name == 'stop_gradient':
      ins_live = [False] * len(eqn.invars)
    elif sub is not None:
      ins_live = _walk(sub, ins_dep, [_is(live, v) for v in eqn.outvars], equivalents, here)
    else:
      for inner in jex_core.jaxprs_in_params(eqn.params):
        _walk(inner, [any(ins_dep)] * len(inner.invars), [grad] * len(inner.outvars), equivalents, here)
      if here:
        raise NotImplementedError(f'semiseg.bench.flops: layers inside {name!r} ({here[0].name}); '
                                  'counting loops and branches is not implemented.')
    found.append(here)
    for v, l in zip(eqn.invars, ins_live):
      if l and not isinstance(v, jex_core.Literal):
        live[v] = True
  layers.extend(layer for here in reversed(found) for layer in here)
  return [_is(live, v) for v in jaxpr.invars]


def count(fn: Callable, *args, wrt: int | None = None) -> Flops:
  """The layers of ``fn(*args)``; ``wrt``: the argument holding the trained parameters (None: inference).

  ``args`` may be arrays or ``jax.ShapeDtypeStruct``s (nothing is computed).
  """
  equivalents: dict[str, int] = {}

  def mark(next_fun, call_args, kwargs, context):
    make = NETWORK_EQUIVALENTS.get(type(context.module))
    if make is None or context.method_name != '__call__':
      return next_fun(*call_args, **kwargs)
    layer, x = make(context.module), jax.ShapeDtypeStruct(call_args[0].shape, call_args[0].dtype)
    params = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x)
    tag = f'{_TAG}{len(equivalents)}'
    equivalents[tag] = sum(l.macs for l in count(layer.apply, params, x).layers)
    with jax.named_scope(tag):
      return next_fun(*call_args, **kwargs)
  with nn.intercept_methods(mark):
    closed = jax.make_jaxpr(fn)(*args)
  dependent = [False] * len(closed.jaxpr.invars)
  if wrt is not None:
    start = sum(len(jax.tree.leaves(a)) for a in args[:wrt])
    for i in range(start, start + len(jax.tree.leaves(args[wrt]))):
      dependent[i] = True
  layers: list[Layer] = []
  _walk(closed.jaxpr, dependent, [True] * len(closed.jaxpr.outvars), equivalents, layers)
  return Flops(tuple(layers))


def method_flops(method, state, images_BxHxWx3) -> Flops:
  """The network of ``method.score_map``, trained with respect to ``state.params``.

  A train step's FLOPs are ``.train()``: the three methods benchmarked (``ae``, ``unet``, ``ae_unet``)
  differentiate the network their ``score_map`` runs (the loss in place of the final sigmoid or mean),
  with respect to ``state.params``; inference is ``.forward()``.
  """
  def forward(params, state, images):
    return method.score_map(state.replace(params=params), images)
  return count(forward, state.params, state, images_BxHxWx3, wrt=0)
