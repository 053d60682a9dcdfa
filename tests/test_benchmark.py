"""experiments.benchmark's commands on tiny shapes (--what=gpu, --what=loop): records, table, JSON,
traces; no timed assertions. The parts have their tests in tests/bench/."""

import collections
import json
import os
import sys

import pytest

import semiseg
from semiseg.bench import networks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
