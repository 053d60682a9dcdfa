"""Local workers: one device (or core set) each, and a worker that fails named with its log and cells."""

import sys

from semiseg import reproduce, workers
from tests.test_reproduce import layout_config


def test_local_workers_plan_one_device_each():
  gpus = workers.plan_workers(8, 'gpu', 8, '/w')
  assert [w.env['CUDA_VISIBLE_DEVICES'] for w in gpus] == [str(i) for i in range(8)]
  assert [w.shard for w in gpus] == [f'{i}/8' for i in range(8)] and gpus[3].log_path == '/w/worker3.log'
  shared = workers.plan_workers(4, 'gpu', 2, '/w')
  assert [w.env['CUDA_VISIBLE_DEVICES'] for w in shared] == ['0', '1', '0', '1']
  assert shared[0].env['XLA_PYTHON_CLIENT_MEM_FRACTION'] == '0.45'
  tpu = workers.plan_workers(4, 'tpu', 4, '/w')
  assert [w.env['TPU_VISIBLE_CHIPS'] for w in tpu] == ['0', '1', '2', '3']
  assert len({w.env['TPU_PROCESS_PORT'] for w in tpu}) == 4
  cpu = workers.plan_workers(2, 'cpu', 1, '/w', cores=[0, 1, 2, 3, 4])
  assert [w.cores for w in cpu] == [(0, 1), (2, 3)] and cpu[1].env[workers.CORES_ENV] == '2,3'
  nested = workers.plan_workers(2, 'cpu', 1, '/w', cores=[0, 1], shard_offset=6, num_shards=8)
  assert [w.shard for w in nested] == ['6/8', '7/8']  # --config.shard=3/4 --config.workers=2
  assert workers.strip_layout_flags(['--config', 'c.py', '--config.workers=2', '--config.shard', '0/2',
                                     '--workdir=w']) == ['--config', 'c.py', '--workdir=w']


def test_a_failed_worker_is_named_with_its_log_and_cells(tmp_path):
  command = [sys.executable, '-c', 'import sys; sys.exit(3)']  # a worker that dies at once
  result = reproduce.reproduce(layout_config(workers=2), str(tmp_path), command=command)
  assert result.cells_run == [] and len(result.workers_failed) == 2
  first = result.workers_failed[0]
  assert first.startswith('worker 0 (shard 0/2) exited with code 3')
  assert str(tmp_path / 'workers' / 'worker0.log') in first
  assert 'washer/seed0/ae, washer/seed0/unet, washer/seed0/ae_unet' in first  # shard 0: washer's group
  assert len(result.cells_missing) == 6
  text = open(result.report_path).read()
  assert 'worker 1 (shard 1/2) exited with code 3' in text and '6 of 6 cells not finished' in text
