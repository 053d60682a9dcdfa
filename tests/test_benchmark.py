"""Smoke test of the benchmark's plumbing on tiny shapes: records, table, JSON; no timed assertions."""

import collections
import json
import os
import re
import sys
import time

import jax
import numpy as np
import pytest

import semiseg
from semiseg.bench import layers, networks, suite

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def single_call_samples(monkeypatch):
  from semiseg.bench import timing
  monkeypatch.setattr(timing, 'MIN_SAMPLE_S', 0.0)  # plumbing tests: no need for steady state


@pytest.fixture(scope='module')
def setting():
  from configs import synthetic
  return suite.Setting('smoke', synthetic.get_config('washer,smoke'), repeats=1)


def test_project_xla_flags_are_in_the_environment():
  for flag in semiseg.project_xla_flags():
    assert flag.split('=', 1)[0] in os.environ.get('XLA_FLAGS', '')


def _child_env() -> dict[str, str]:
  env = dict(os.environ)
  env.update(JAX_COMPILATION_CACHE_DIR=os.environ['SEMISEG_TEST_JAX_CACHE'],  # the tests' compilation cache
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return env


def gpu_command_job(tmp_path_factory, background):
  """The GPU check's command at the smoke shapes (in-memory data), run by the session's background thread
  (conftest.Background)."""
  tmp_path = tmp_path_factory.mktemp('gpu_command')
  out, trace = tmp_path / 'gpu.json', tmp_path / 'trace'
  cmd = [sys.executable, '-m', 'experiments.benchmark', '--what=gpu', '--shapes=smoke', f'--out={out}',
         f'--trace={trace}', '--repeats=1', '--min_sample_s=0', '--gemm_n=64', '--torch_variants=fp32,bf16_cl',
         '--loop_steps=2']
  env = _child_env()
  return lambda: (background.run(cmd, cwd=ROOT, env=env, timeout=600), out, trace)


@pytest.fixture(scope='module')
def gpu_command(background, tmp_path_factory):
  return background.result('gpu_command', gpu_command_job, tmp_path_factory)


def test_gpu_command_on_tiny_shapes(gpu_command):
  """The GPU check, at the smoke shapes on this CPU: GEMM peaks per precision; train steps of the three
  methods and AE + U-Net inference at batch 1 and 16, fp32 and bf16, each beside the PyTorch variants of
  its precision; analytic GFLOP/s against the peak of the row's precision; JSON and traces written."""
  proc, out, trace = gpu_command
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(out.read_text())
  by_workload = collections.defaultdict(list)
  for row in rows:
    by_workload[row['workload']].append(row)
  assert [r['precision'] for r in rows if r['workload'].startswith('gemm')] == ['fp32', 'bf16']
  peaks = {r['precision']: r['peak_gflop_per_s'] for r in rows if r['workload'].startswith('gemm')}
  assert all(p > 0 for p in peaks.values())
  torch_installed = 'not installed' not in rows[0]['reference']
  for workload in [f'train {m}' for m in networks.TRAIN_METHODS] + ['infer ae_unet b1', 'infer ae_unet b16']:
    got = by_workload[workload]
    assert sorted(r['precision'] for r in got) == ['bf16', 'fp32'], workload
    for r in got:
      assert r['semiseg_per_s'] > 0 and r['gflops_per_call'] > 0 and r['xla_gflops_per_call'] > 0
      assert r['peak_precision'] == r['precision'] and r['peak_gflop_per_s'] == peaks[r['precision']]
      per_call = 1 if workload.startswith('train') else r['batch_size']
      assert r['semiseg_gflop_per_s'] == pytest.approx(r['gflops_per_call'] * r['semiseg_per_s'] / per_call)
      expected = {'fp32': 'fp32 NCHW eager', 'bf16': 'bf16 autocast channels_last eager'}[r['precision']]
      assert r['reference'].endswith(expected) if torch_installed else r['reference_per_s'] is None
      assert r['ratio'] or not torch_installed
    if workload.startswith('train'):  # the analytic count of the workload's network, not XLA's
      assert got[0]['semiseg_images_per_s'] == pytest.approx(got[0]['semiseg_per_s'] * got[0]['batch_size'])
      method, state = networks.abstract_method(setting_config(), workload.split()[1])
      count = networks.workload_flops(method, state, got[0]['batch_size'], 32).train()
      assert got[0]['gflops_per_call'] == pytest.approx(count / 1e9)
      for suffix in ('', '_bf16'):  # one profiled step each
        assert list(trace.glob(f'smoke_{workload.split()[1]}{suffix}/**/*.trace.json.gz')), workload
  assert '| train ae_unet | bf16 |' in proc.stdout
  assert [r['ratio'] > 0 for r in by_workload['loop']] == [True]


def setting_config():
  from configs import synthetic
  return synthetic.get_config('washer,smoke')


def loop_command_job(tmp_path_factory, background):
  """--what=loop at the smoke shapes, run by the session's background thread (conftest.Background)."""
  out = tmp_path_factory.mktemp('loop_command') / 'loop.json'
  cmd = [sys.executable, '-m', 'experiments.benchmark', '--what=loop', '--shapes=smoke', f'--out={out}',
         '--repeats=1', '--loop_steps=3', '--gemm_n=64']
  env = _child_env()
  return lambda: (background.run(cmd, cwd=ROOT, env=env, timeout=600), out)


BACKGROUND_JOBS = {'gpu_command': gpu_command_job, 'loop_command': loop_command_job}


@pytest.fixture(scope='module')
def loop_command(background, tmp_path_factory):
  return background.result('loop_command', loop_command_job, tmp_path_factory)


def test_loop_record_on_tiny_shapes(loop_command):
  """--what=loop writes a loop record: the loop's images/s beside the bare jitted step's, ratio = loop / step."""
  proc, out = loop_command
  assert proc.returncode == 0, proc.stderr[-3000:]
  [loop] = [r for r in json.loads(out.read_text()) if r['workload'] == 'loop']
  assert loop['unit'] == 'images/s' and loop['semiseg_per_s'] > 0 and loop['reference_per_s'] > 0
  assert loop['ratio'] == pytest.approx(loop['semiseg_per_s'] / loop['reference_per_s'])
  assert loop['batch_size'] == 4 and 'unet, 2 steps after the first' in loop['note']


def test_the_loop_benchmark_ends_on_a_checkpoint_interval(setting):
  """By default the loop runs one checkpoint interval, so its only save is its end's (as a run of the config
  saves every interval), not an interval's save followed at once by the end's."""
  from semiseg.bench import loop
  every = setting.config.ckpt.every_steps
  assert loop.loop_config(setting, 'unet', None).num_train_steps == every
  assert loop.loop_config(setting, 'unet', 3 * every).num_train_steps == 3 * every
  with pytest.raises(ValueError, match='at least 2 steps'):
    loop.loop_config(setting, 'unet', 1)


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


def test_input_augment_records_and_table(setting):
  records = suite.bench_input(setting, 10.0, steps=2) + suite.bench_augment(batch_size=2, image_size=16, repeats=1)
  assert [r.workload for r in records] == ['input', 'augment']
  assert all(r.semiseg_per_s > 0 and r.ratio > 0 for r in records)
  table = suite.markdown(records)
  assert table.count('\n') == len(records) + 1 and '| augment | fp32 |' in table
  # 11 cells on every line: the '|' in the augment note is escaped.
  assert all(len(re.split(r'(?<!\\)\|', line)) == 13 for line in table.splitlines())
  rows = json.loads(json.dumps([r.to_dict() for r in records]))
  assert {'workload', 'semiseg_per_s', 'reference_per_s', 'ratio', 'unit', 'device', 'shapes'} <= set(rows[0])


def test_stages_keep_what_was_measured(tmp_path):
  """A stage that fails or runs out of time leaves a row saying so; the JSON holds every row so far."""
  from semiseg.bench import timing
  out = tmp_path / 'b.json'
  stages = suite.Stages(str(out), stage_limit_s=0.5, time_limit_s=None)
  row = suite.Record('one', 1.0, 2.0, 'steps/s', 'cpu', '')
  stages.run('first', lambda: [row])
  assert [r['workload'] for r in json.loads(out.read_text())] == ['one']
  start = time.monotonic()

  def slow():
    while True:
      timing.alternating_medians({'a': lambda: time.sleep(0.01)}, repeats=1000, min_sample_s=0.01)
  assert stages.run('slow', slow) is None and time.monotonic() - start < 5
  stages.run('broken', lambda: 1 / 0)
  rows = json.loads(out.read_text())
  assert [r['workload'] for r in rows] == ['one', 'slow (stage)', 'broken (stage)']
  assert 'stopped after its 0 s limit' in rows[1]['note'] and 'ZeroDivisionError' in rows[2]['note']
  assert stages.failed == ['slow', 'broken']


def test_alternating_medians_stops_before_a_time_limit():
  from semiseg.bench import timing
  start = time.monotonic()
  with timing.time_limit(1.0, 'stage'):
    t = timing.alternating_medians({'a': lambda: time.sleep(0.05)}, repeats=1000, min_sample_s=0.05)
  assert 0.05 <= t['a'] < 0.5 and time.monotonic() - start < 1.0


def test_scipy_reference_does_the_same_warp():
  from semiseg import augment
  images = np.random.default_rng(0).random((2, 12, 12, 3)).astype(np.float32)
  matrices = augment.sample_matrices(jax.random.PRNGKey(0), 2, augment.AugmentSpec(), (12, 12), (12, 12))
  ours = augment.warp_batch(images, matrices, (12, 12), 1, 'constant')
  np.testing.assert_allclose(ours, suite.scipy_warp_loop(images, np.asarray(matrices)), atol=1e-5)


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


def _numpy_conv3x3(x, k):
  """Cross-correlation with zero padding 1, by shifted products: the independent reference."""
  b, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).astype(np.float64)
  return sum(np.einsum('bhwc,co->bhwo', xp[:, i:i + h, j:j + w], k[i, j]) for i in range(3) for j in range(3))


def _numpy_conv3x3_grads(x, k, dy):
  """dL/dx and dL/dk of sum(dy * conv(x, k)), from the definition."""
  b, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).astype(np.float64)
  dxp = np.zeros_like(xp)
  dk = np.zeros(k.shape, np.float64)
  for i in range(3):
    for j in range(3):
      dk[i, j] = np.einsum('bhwc,bhwo->co', xp[:, i:i + h, j:j + w], dy)
      dxp[:, i:i + h, j:j + w] += np.einsum('bhwo,co->bhwc', dy, k[i, j])
  return dxp[:, 1:-1, 1:-1], dk


def test_conv_ops_compute_the_convolution_and_its_gradients():
  shape = (2, 6, 5, 3, 4)
  inputs = layers.conv_inputs(shape, seed=1)
  x, k, dy = inputs['x'], inputs['kernel'], inputs['dy']
  dx, dk = _numpy_conv3x3_grads(x, k, dy)
  expected = {'fwd': _numpy_conv3x3(x, k), 'dx': dx, 'dw': dk}
  ours = layers.jax_conv_ops(inputs)
  for op in layers.CONV_OPS:
    np.testing.assert_allclose(np.asarray(ours[op]()), expected[op], rtol=1e-4, atol=1e-4, err_msg=op)
  torch = suite.Torch()
  if torch.module is not None:  # the reference kernels compute the same three things
    ref = layers.torch_conv_ops(torch, inputs)
    for op in layers.CONV_OPS:
      np.testing.assert_allclose(layers.torch_result_as_jax_layout(op, ref[op]()), expected[op],
                                 rtol=1e-4, atol=1e-4, err_msg=f'torch {op}')


def test_unet_conv_shapes_are_the_unets_3x3_kernels(setting):
  import collections
  import jax.numpy as jnp
  from semiseg.models.unet import UNet
  m, c = setting.config.model, setting.config
  shapes = layers.unet_conv_shapes(c)
  params = jax.eval_shape(UNet(features=m.unet_features, depth=m.unet_depth).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, c.data.image_size, c.data.image_size, 6)))
  kernels = collections.Counter(tuple(leaf.shape[2:]) for leaf in jax.tree.leaves(params)
                                if leaf.shape[:2] == (3, 3))
  pairs = collections.Counter()
  for (_, _, _, cin, cout), n in shapes.items():
    pairs[(cin, cout)] += n
  assert kernels == pairs
  assert all(b == c.batch_size and h == w and c.data.image_size % h == 0 for b, h, w, _, _ in shapes)


def test_layer_records(setting):
  records = layers.bench_layers(setting, suite.Torch(), {'fp32': 1.0})
  shapes = layers.unet_conv_shapes(setting.config)
  assert len(records) == 3 * len(shapes) + 3
  per_layer, sums = records[:-3], {r.workload.split()[-1]: r for r in records[-3:]}
  assert set(sums) == set(layers.CONV_OPS)
  for op in layers.CONV_OPS:
    rows = [r for r in per_layer if r.workload.split()[1] == op]
    assert len(rows) == len(shapes) and all(r.semiseg_per_s > 0 for r in rows)
    seconds = sum(n / r.semiseg_per_s for r, n in zip(rows, shapes.values()))
    assert sums[op].semiseg_per_s == pytest.approx(1 / seconds)
    # 2 FLOPs per multiply-add over the taps that read an input: 3n - 2 per dimension of n ('SAME' padding).
    flops = sum(n * 2 * b * (3 * h - 2) * (3 * w - 2) * ci * co for (b, h, w, ci, co), n in shapes.items())
    assert sums[op].gflops_per_call == pytest.approx(flops / 1e9)


def test_alternating_medians_samples_back_to_back_and_divides():
  from semiseg.bench import timing
  counts = {'a': 0, 'b': 0}

  def a():
    counts['a'] += 1
    time.sleep(0.002)

  def b():
    counts['b'] += 1
    time.sleep(0.02)
  t = timing.alternating_medians({'a': a, 'b': b, 'c': None}, repeats=3, warmup=1, min_sample_s=0.04)
  assert t['c'] is None
  assert 0.002 <= t['a'] < 0.02 and 0.02 <= t['b'] < 0.2
  # a: 1 warm-up + 3 samples of ceil(0.04 / ~0.002) calls (up to 20 each); b: 1 + 3 x 2 (fewer if slow).
  assert counts['a'] >= 1 + 3 * 2 and counts['a'] > counts['b'] and counts['b'] <= 1 + 3 * 2
