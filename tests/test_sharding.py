"""The data-parallel mesh: every method's step on 4 fake devices equals one device; multi-host start; bf16."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from semiseg import sharding
from configs import synthetic
from semiseg.methods import REGISTRY, testing

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'multihost_worker.py')
CLUSTER_VARS = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID', 'SLURM_NTASKS',
                'OMPI_COMM_WORLD_SIZE', 'TPU_WORKER_HOSTNAMES')


def run_worker(args: list[str], out: str, timeout: float = 600, run=subprocess.run) -> dict:
  """Runs tests/multihost_worker.py in a fresh interpreter (its own XLA_FLAGS) and reads its JSON;
  ``run``: subprocess.run or a conftest.Background's."""
  proc = run([sys.executable, WORKER, *args, '--out', out], capture_output=True, text=True,
             timeout=timeout, cwd=os.path.dirname(os.path.dirname(WORKER)))
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(out) as f:
    return json.load(f)


def four_devices_job(tmp_path_factory, background):
  """Two steps of every registry method with a train step, on 4 fake devices and on 1, in one child
  (conftest.Background: started with the session)."""
  out = str(tmp_path_factory.mktemp('steps') / 'steps.json')
  return lambda: run_worker(['steps', '--devices', '4', '--size', '16', '--batch', '8', '--num_steps', '2'],
                            out, run=background.run)


BACKGROUND_JOBS = {'four_devices': four_devices_job}


@pytest.fixture(scope='module')
def four_devices(background, tmp_path_factory):
  return background.result('four_devices', four_devices_job, tmp_path_factory)


@pytest.mark.parametrize('name', sorted(REGISTRY))
def test_step_on_four_devices_equals_one_device(four_devices, name):
  assert four_devices['device_count'] == 4
  if name not in four_devices['methods']:
    pytest.skip(f'{name} is closed-form (no train_step)')
  r = four_devices['methods'][name]
  assert r['spec'] == "P('data',)" and r['shard_shapes'] == [[2, 16, 16, 3]], r  # 8 rows over 4 devices
  assert r['state_replicated'] and r['step'] == 2
  np.testing.assert_allclose(r['loss_full'], r['loss_one'], rtol=2e-5, atol=1e-6)
  assert all(np.isfinite(r['loss_full']))
  # Same global batch, same math; only the order of the cross-device sum differs.
  assert r['max_param_diff'] <= 1e-5 * max(1.0, r['max_param_abs']), r


def test_batch_that_does_not_divide_names_the_numbers():
  mesh = types.SimpleNamespace(devices=np.empty(4, object))
  sharding.check_batch_size(8, mesh)
  with pytest.raises(ValueError, match=r'config.batch_size=6 does not divide by the 4 devices.*'
                                       r'config.batch_size=8 or 4'):
    sharding.check_batch_size(6, mesh)
  with pytest.raises(ValueError, match=r'config.unlabeled_batch_size=3 .* e.g. config.unlabeled_batch_size=4\.'):
    sharding.check_batch_size(3, mesh, 'config.unlabeled_batch_size')


def test_one_device_mesh_places_state_and_batch():
  mesh = sharding.create_mesh()
  assert mesh.axis_names == ('data',) and mesh.devices.size == jax.device_count()
  state = sharding.create_sharded_state(lambda k: {'w': jax.random.normal(k, (3,))}, jax.random.PRNGKey(0), mesh)
  assert state['w'].sharding.is_equivalent_to(sharding.replicated(mesh), 1)
  batch = sharding.to_global({'image': np.zeros((4, 2, 2, 3), np.uint8)}, mesh)
  assert batch['image'].shape == (4, 2, 2, 3) and batch['image'].sharding.spec == jax.sharding.PartitionSpec('data')
  abstract = sharding.abstract_state(lambda k: {'w': jax.random.normal(k, (3,))}, jax.random.PRNGKey(0), mesh)
  assert abstract['w'].shape == (3,) and abstract['w'].sharding == sharding.replicated(mesh)
  odd = sharding.from_full_array(np.arange(5 * jax.device_count() + 1), mesh)
  np.testing.assert_array_equal(np.asarray(odd), np.arange(5 * jax.device_count() + 1))
  assert sharding.main_process_first(lambda: 7, 'test') == 7


def test_run_once_compile_gives_the_default_compile_values():
  """The state's init compiled at XLA's lowest optimization level (sharding.RUN_ONCE_COMPILER_OPTIONS)
  draws the same initial weights as the default compile, up to float rounding."""
  import flax.linen as nn

  def init(key):
    k1, k2 = jax.random.split(key)
    return {'conv': nn.initializers.lecun_normal()(k1, (3, 3, 8, 16)),
            'dense': nn.initializers.truncated_normal(0.02)(k2, (64, 10)), 'steps': jax.numpy.zeros((), 'int32')}

  assert sharding.run_once_compiler_options() == ({'xla_backend_optimization_level': 0}
                                                 if jax.default_backend() == 'cpu' else {})
  key = jax.random.PRNGKey(3)
  got = sharding.create_sharded_state(init, key, sharding.create_mesh())
  want = jax.jit(init)(key)
  for name in want:
    np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name]), rtol=1e-6, atol=1e-7)
  assert float(np.std(np.asarray(got['conv']))) == pytest.approx((1 / (3 * 3 * 8)) ** 0.5, rel=0.1)


@pytest.fixture
def initialize_calls(monkeypatch):
  """Records jax.distributed.initialize calls instead of starting a cluster."""
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda *a, **k: calls.append(a))
  for var in CLUSTER_VARS:
    monkeypatch.delenv(var, raising=False)
  return calls


def test_multihost_start_from_flags_and_environment(initialize_calls, monkeypatch):
  assert not sharding.maybe_initialize_distributed() and initialize_calls == []
  monkeypatch.setenv('SLURM_NTASKS', '1')  # a one-task SLURM job is one process: nothing to start
  assert not sharding.maybe_initialize_distributed()
  assert sharding.maybe_initialize_distributed('10.0.0.1:1234', 2, 1)
  assert initialize_calls[-1] == ('10.0.0.1:1234', 2, 1)
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', 'h0:99')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '4')
  monkeypatch.setenv('JAX_PROCESS_ID', '3')
  assert sharding.maybe_initialize_distributed()
  assert initialize_calls[-1] == ('h0:99', 4, 3)
  for var in CLUSTER_VARS:
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv('SLURM_NTASKS', '8')  # JAX reads the rest from SLURM itself
  assert sharding.maybe_initialize_distributed()
  assert initialize_calls[-1] == () and len(initialize_calls) == 3
  for var in CLUSTER_VARS:
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 't1v-0')  # a single-host TPU VM: one process, nothing to start
  assert not sharding.maybe_initialize_distributed() and len(initialize_calls) == 3
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 't1v-0,t1v-1,t1v-2,t1v-3')  # a pod slice: JAX reads the rest
  assert sharding.maybe_initialize_distributed()
  assert initialize_calls[-1] == () and len(initialize_calls) == 4
  with pytest.raises(ValueError, match='--coordinator_address, --num_processes and --process_id'):
    sharding.maybe_initialize_distributed('10.0.0.1:1234', None, None)


def sub_jaxprs(value):
  """The jaxprs inside an equation's parameter (a jaxpr, a closed jaxpr, or a list of them)."""
  if hasattr(value, 'eqns'):
    return [value]
  if hasattr(value, 'jaxpr') and hasattr(value.jaxpr, 'eqns'):
    return [value.jaxpr]
  if isinstance(value, (list, tuple)):
    return [j for v in value for j in sub_jaxprs(v)]
  return []


def convolution_dtypes(fn, *args) -> list[tuple[str, ...]]:
  """The operand dtypes of every convolution ``fn`` computes, forward and backward, nested calls included."""
  out = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'conv_general_dilated':
        out.append(tuple(str(v.aval.dtype) for v in eqn.invars))
      for value in eqn.params.values():
        for sub in sub_jaxprs(value):
          walk(sub)
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return out


@pytest.mark.parametrize('name', ['unet', 'ae_unet'])
def test_bfloat16_step_computes_in_bfloat16_with_float32_params_and_loss(name):
  losses, convs = {}, {}
  for dtype in ('float32', 'bfloat16'):
    tiny = testing.create_tiny(synthetic.get_config(f'washer,smoke,method={name}'), batch_size=4, dtype=dtype)
    method, state = tiny.method, tiny.state
    # Every convolution of the step (U-Net and, for ae_unet, the frozen AE; forward and gradients)
    # reads its activations and kernels in the compute dtype, except D's fixed Gaussian blur
    # (config.model.diff_blur, two separable passes on the float32 D; no weights, no gradient).
    convs[dtype] = convolution_dtypes(method.train_step, state, tiny.batch)
    blur_passes = 2 if name == 'ae_unet' and tiny.config.model.diff_blur > 0 else 0
    rest = [c for c in convs[dtype] if c != ('float32', 'float32')] if dtype == 'bfloat16' else convs[dtype]
    assert rest and set(rest) == {(dtype, dtype)}, (dtype, sorted(set(convs[dtype])))
    if dtype == 'bfloat16':
      assert len(convs[dtype]) - len(rest) == blur_passes, sorted(set(convs[dtype]))
    new, metrics = jax.jit(method.train_step)(state, tiny.batch)
    assert metrics['loss'].dtype == jax.numpy.float32 and np.isfinite(float(metrics['loss']))
    assert {x.dtype for x in jax.tree.leaves(new.params)} == {np.dtype('float32')}
    assert any(bool(jax.numpy.any(a != b)) for a, b in zip(jax.tree.leaves(state.params),
                                                           jax.tree.leaves(new.params)))
    losses[dtype] = float(metrics['loss'])
  assert len(convs['float32']) == len(convs['bfloat16'])  # the same network, another dtype
  # Same initial parameters and batch: bf16 activations move the loss, by well under 5%.
  assert 0 < abs(losses['bfloat16'] - losses['float32']) < 5e-2 * abs(losses['float32']), losses
