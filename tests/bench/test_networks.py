"""The benchmark's workloads: their analytic FLOP count against XLA's cost analysis of the compiled
programs; a failing torch.compile recorded while the rest is measured."""

import copy

import jax
import jax.numpy as jnp
import pytest

from semiseg.bench import networks, suite


@pytest.mark.parametrize('name', networks.TRAIN_METHODS)
def test_workloads_match_xla_up_to_elementwise_ops(smoke_config, name):
  """XLA's cost analysis of the compiled train step and inference (CPU) against the analytic count of
  the operations the program runs: XLA counts 0-10 % more, its elementwise ops (bias, activations,
  augmentation, loss, Adam; 6-7 % of a train step at these tiny shapes, 0.2-1.2 % at the paper's).
  On the paper's plain U-Net: the CPU preset's GroupNorm adds elementwise ops (15 % of a step at the
  smoke widths of 4-16 channels), which the count of convolution and dense layers leaves out by design."""
  smoke_config = copy.deepcopy(smoke_config)
  smoke_config.model.unet_norm = 'none'
  method, state = networks.abstract_method(smoke_config, name)
  b, s = smoke_config.batch_size, smoke_config.data.image_size
  images = jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32)
  batch = jax.eval_shape(lambda: networks._batch(smoke_config))
  count = networks.workload_flops(method, state, b, s)
  train = jax.jit(method.train_step, donate_argnums=0).lower(state, batch).compile().cost_analysis()['flops']
  forward = jax.jit(method.score_map).lower(state, images).compile().cost_analysis()['flops']
  assert 1.0 <= train / count.train(implemented=True) <= 1.10
  assert 1.0 <= forward / count.forward(implemented=True) <= 1.05
  # The network's math: the AE's UpConv4x4 counted as the transposed convolution it stands for.
  has_ae = name != 'unet'
  assert (count.forward() < count.forward(implemented=True)) == has_ae
  assert sum(l.macs != l.implemented_macs for l in count.layers) == (len(smoke_config.model.ae_features)
                                                                     if has_ae else 0)
  if name == 'ae_unet':  # the frozen AE runs forward only; the U-Net's first layer reads the data
    ae = [(l.input_grad, l.weight_grad) for l in count.layers if l.name.startswith('ConvAutoencoder')]
    seg = [(l.input_grad, l.weight_grad) for l in count.layers if l.name.startswith('UNet')]
    # D's fixed Gaussian blur (config.model.diff_blur): two separable passes, no gradient.
    blur = [(l.input_grad, l.weight_grad) for l in count.layers
            if not l.name.startswith(('ConvAutoencoder', 'UNet'))]
    assert blur == [(False, False)] * (2 if smoke_config.model.diff_blur > 0 else 0)
    assert len(ae) + len(seg) + len(blur) == len(count.layers) and ae == [(False, False)] * len(ae)
    assert seg == [(False, True)] + [(True, True)] * (len(seg) - 1)


def test_a_failing_torch_compile_is_recorded_and_the_rest_measured(setting, monkeypatch):
  torch = suite.Torch()
  if torch.module is None:
    pytest.skip('PyTorch not installed')

  def no_compiler(module, *args, **kwargs):
    raise RuntimeError('InductorError: no working C++ compiler')
  monkeypatch.setattr(torch.module, 'compile', no_compiler)
  records = networks.bench_infer(setting, torch, {'fp32': 1.0}, batch_sizes=(1,), precisions=('fp32',),
                              variants=('fp32', 'fp32_cl_compile'))
  assert [r.reference.split(' cpu ')[-1] for r in records] == ['fp32 NCHW eager', 'fp32 channels_last compiled']
  plain, compiled = records
  assert plain.ratio > 0 and compiled.semiseg_per_s > 0 and compiled.reference_per_s is None
  assert 'RuntimeError: InductorError: no working C++ compiler' in compiled.note
