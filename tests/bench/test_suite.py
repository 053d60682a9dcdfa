"""The benchmark's records and shared parts: the input and augment rows and their table, stages under time
limits, the scipy warp loop the augment row is set against."""

import json
import re
import time

import jax
import numpy as np

from semiseg.bench import suite


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


def test_scipy_reference_does_the_same_warp():
  from semiseg import augment
  images = np.random.default_rng(0).random((2, 12, 12, 3)).astype(np.float32)
  matrices = augment.sample_matrices(jax.random.PRNGKey(0), 2, augment.AugmentSpec(), (12, 12), (12, 12))
  ours = augment.warp_batch(images, matrices, (12, 12), 1, 'constant')
  np.testing.assert_allclose(ours, suite.scipy_warp_loop(images, np.asarray(matrices)), atol=1e-5)
