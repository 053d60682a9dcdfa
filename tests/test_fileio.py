"""Files a run writes: strict JSON everywhere (null where a number is undefined), read back as NaN."""

import json
import math
import os

import numpy as np
import pytest

from semiseg import fileio, report


def _no_constants(name):
  raise AssertionError(f'bare {name} in a JSON file: not JSON (RFC 8259); write null')


def load_strict(text: str):
  """json.loads that fails on NaN / Infinity instead of accepting Python's extension."""
  return json.loads(text, parse_constant=_no_constants)


def assert_strict_json_files(folder) -> int:
  """Every *.json and *.jsonl file under ``folder`` parses as strict JSON; returns how many."""
  n = 0
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      if name.endswith('.json'):
        load_strict(open(path).read())
        n += 1
      elif name.endswith('.jsonl'):
        for line in open(path):
          load_strict(line)
        n += 1
  return n


def test_non_finite_numbers_are_written_as_null(tmp_path):
  obj = {'auroc': float('nan'), 'threshold': float('inf'), 'ok': 0.5, 'n': 3, 'flag': True, 'name': 'a',
         'nested': [{'x': np.float32('nan')}, (1.0, -math.inf)], 'array': np.array([1.0, np.nan]),
         'scalar': np.float64(2.5), 'none': None}
  path = tmp_path / 'x.json'
  fileio.write_json_atomic(str(path), obj)
  back = load_strict(path.read_text())
  assert back == {'auroc': None, 'threshold': None, 'ok': 0.5, 'n': 3, 'flag': True, 'name': 'a',
                  'nested': [{'x': None}, [1.0, None]], 'array': [1.0, None], 'scalar': 2.5, 'none': None}
  with pytest.raises(AssertionError, match='bare NaN'):
    load_strict(json.dumps({'a': float('nan')}))  # the check itself sees what Python's json writes


def test_the_report_reads_null_as_nan():
  ev = {'test': {'defect_iou': 0.5, 'image_auroc': None}, 'train': {'defect_iou': None},
        'ms_per_image': {'batch_1': None, 'batch_8': 2.0, 'device': 'cpu'}}
  ev = load_strict(fileio.to_json(ev))
  test, train = report.rows_from_eval(ev, 'd', 'c', 'ae', 'main', 0)
  assert test['defect_iou'] == 0.5 and math.isnan(test['image_auroc']) and math.isnan(train['defect_iou'])
  assert math.isnan(test['pixel_auroc'])  # absent
  assert test['ms_per_image'] == 2.0


@pytest.mark.parametrize('arg,recipe', [('washer,smoke', 'semiseg'), ('washer,smoke,recipe=paper', 'paper')])
def test_run_info_names_the_recipe(arg, recipe):
  """run_info.json records the whole resolved config, so any number traces back to its recipe."""
  from configs import synthetic
  info = json.loads(fileio.to_json(fileio.run_info(synthetic.get_config(arg))))
  assert info['config']['recipe'] == recipe and info['config']['method'] == 'ae_unet'
