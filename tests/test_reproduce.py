"""reproduce end to end on a smoke config: CSV columns, every table, figures; a rerun trains nothing;
shards and local workers give the same numbers as one process, and a collecting call writes the report."""

import json
import os
import shutil
import sys

import numpy as np
import pytest
from PIL import Image
from scipy.spatial import distance
from sklearn.metrics import roc_auc_score

from configs import reproduce as reproduce_config
from semiseg import evaluate, fileio, grid, report, reproduce, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CELLS = ('ae', 'unet', 'ae_unet', 'unet_no_aug', 'ae_unet_diff')


def smoke_config():
  c = reproduce_config.get_config('synthetic,smoke')
  c.categories, c.methods, c.seeds = 'washer', 'ae,unet,ae_unet', '0'
  return c


@pytest.fixture(scope='module')
def repro(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('repro'))
  return root, reproduce.reproduce(smoke_config(), root, progress=False)


def test_results_csv_has_the_exact_columns_and_every_cell(repro):
  root, result = repro
  with open(os.path.join(root, 'results.csv')) as f:
    assert f.readline().strip() == ','.join(report.RESULT_COLUMNS)
  rows = report.read_csv(os.path.join(root, 'results.csv'))
  keys = {(r['method'], r['variant'], r['split']) for r in rows}
  for method, variant in (('ae', 'main'), ('unet', 'main'), ('ae_unet', 'main'), ('unet', 'no_aug'),
                          ('ae_unet', 'diff')):
    assert {(method, variant, 'test'), (method, variant, 'train')} <= keys
  assert ('ae', 'oracle', 'test') in keys  # anomaly-score method: its oracle row, under that name
  assert all(0 <= r['defect_iou'] <= 1 and r['seed'] == 0 and r['ms_per_image'] > 0 for r in rows)
  assert sorted(result.cells_run) == sorted(f'washer/seed0/{c}' for c in CELLS) and not result.cells_failed


def test_report_has_every_table_and_the_figures(repro):
  root, result = repro
  text = open(result.report_path).read()
  for heading in ('Table 1', 'Table 2:', 'Table 2b', 'Table 3', 'Table 4', 'Table A1', 'Table A2',
                  'Threshold-free', 'Figure 6'):
    assert f'## {heading}' in text, heading
  assert '](figures/fig6_washer.png)' in text
  # The recipe and commit that made it (the smoke grid runs configs/synthetic.py's recipe=semiseg).
  info = json.load(open(os.path.join(root, 'washer', 'seed0', 'unet', 'run_info.json')))
  assert info['config']['recipe'] == 'semiseg'
  assert f"Recipe `semiseg`" in text and f"commit `{info['git_commit'] or 'unknown'}`" in text
  fig = Image.open(os.path.join(root, 'figures', 'fig6_washer.png'))
  assert fig.size[0] > 600 and fig.size[1] > 300
  test_count = len(report.read_csv(os.path.join(root, 'results.csv')))  # any file: just readable
  assert test_count
  n_test = int(fileio.read_json(os.path.join(root, 'washer', 'seed0', 'ae', 'eval.json'))['num_test_images'])
  for method in ('ae', 'unet', 'ae_unet'):
    pngs = os.listdir(os.path.join(root, 'figures', 'overlays', 'washer', method))
    assert len(pngs) == n_test and all(p.endswith('.png') for p in pngs)


def test_diff_quality_csv_and_table_against_an_independent_auroc(repro):
  root, result = repro
  with open(os.path.join(root, 'diff_quality.csv')) as f:
    assert f.readline().strip() == ','.join(report.DIFF_QUALITY_COLUMNS)
  rows = report.read_csv(os.path.join(root, 'diff_quality.csv'))
  assert sorted((r['category'], r['seed'], r['split']) for r in rows) == [('washer', 0, 'labeled'),
                                                                          ('washer', 0, 'test')]
  # The trivial yardstick |I - M| recomputed here from the data with scikit-learn (the CSV's comes
  # from the streaming histogram metrics).
  from semiseg.data import pipeline
  config = grid.cell_config(smoke_config(), grid.Cell('synthetic_defects', 'washer', 0, 'ae'), root)
  data = pipeline.load_category(config.data, os.path.join(root, 'washer'))
  mean = data.unlabeled.images.astype(np.float64).mean(0) / 255.0
  for split, part in (('test', data.test), ('labeled', data.labeled)):
    diff = np.abs(part.images / 255.0 - mean)  # reduced over channels as the config's D
    trivial = diff.max(-1) if config.model.diff_channels == 'max' else diff.mean(-1)
    expected = roc_auc_score(part.masks[..., 0].ravel().astype(bool), trivial.ravel())
    got = next(r for r in rows if r['split'] == split)
    assert got['trivial_auroc'] == pytest.approx(expected, abs=2e-3), split
    # The colour yardstick: scipy's Mahalanobis distance from M under the unlabeled pixels' colour
    # covariance (+ the uint8 rounding variance), ranked by scikit-learn.
    dev = (data.unlabeled.images / 255.0 - mean).reshape(-1, 3)
    vi = np.linalg.inv(dev.T @ dev / len(dev) + evaluate.ROUNDING_VARIANCE * np.eye(3))
    x = (part.images / 255.0 - mean).reshape(-1, 3)
    colour = distance.cdist(x, np.zeros((1, 3)), 'mahalanobis', VI=vi)[:, 0]
    expected = roc_auc_score(part.masks[..., 0].ravel().astype(bool), colour)
    assert got['colour_auroc'] == pytest.approx(expected, abs=2e-3), split
    assert 0.0 <= got['pixel_auroc'] <= 1.0 and 0.0 <= got['pixel_ap'] <= 1.0
  text = open(result.report_path).read()
  assert '## Difference image' in text and '|I − M| AUROC' in text


def test_training_curves_per_category_linked_from_the_report(repro):
  root, result = repro
  text = open(result.report_path).read()
  assert '## Training curves' in text and '](figures/curves_washer.png)' in text
  fig = Image.open(os.path.join(root, 'figures', 'curves_washer.png'))
  assert fig.size[0] > 500
  # The convergence table: each trained cell's loss windows, recomputed here from its metrics.jsonl.
  assert '### Convergence' in text
  conv = {r['method']: r for r in report.read_csv(os.path.join(root, 'convergence.csv'))}
  assert {'ae', 'unet', 'ae_unet'} <= set(conv)
  records = [json.loads(line) for line in open(os.path.join(root, 'washer', 'seed0', 'unet', 'metrics.jsonl'))]
  last = records[-1]['step']
  end = [r['loss'] for r in records if 0.9 * last < r['step'] <= last]
  assert conv['unet']['steps'] == last and conv['unet']['loss_100'] == pytest.approx(np.mean(end))


def test_rerun_skips_finished_cells(repro, monkeypatch):
  root, _ = repro
  evals = [os.path.join(root, 'washer', 'seed0', c, 'eval.json') for c in CELLS]
  before = [os.stat(p).st_mtime_ns for p in evals]

  def no_training(*args, **kwargs):
    raise AssertionError('a finished cell was trained again')
  monkeypatch.setattr(train, 'train', no_training)
  again = reproduce.reproduce(smoke_config(), root, progress=False)
  assert again.cells_run == [] and again.cells_failed == [] and len(again.cells_skipped) == len(CELLS)
  assert [os.stat(p).st_mtime_ns for p in evals] == before
  assert os.path.exists(again.report_path)


def test_a_changed_config_is_not_finished(repro):
  root, _ = repro
  config = smoke_config()
  cells, _ = grid.plan(config)
  other = config.copy_and_resolve_references()
  other.threshold = 0.4
  for c in cells:
    assert grid.finished_eval(c.workdir(root), grid.fingerprint(grid.cell_config(config, c, root)))
    assert not grid.finished_eval(c.workdir(root),
                                       grid.fingerprint(grid.cell_config(other, c, root)))


@pytest.mark.parametrize('arg', ['synthetic', 'synthetic,smoke', 'mvtec', 'mvtec,smoke', 'folder,smoke',
                                 'synthetic,smoke,seeds=4,batch_size=2'])
def test_config_loads_and_locks(arg):
  c = reproduce_config.get_config(arg)
  c.lock()
  assert isinstance(c.methods, str) and isinstance(c.seeds, str) and isinstance(c.categories, str)
  assert grid.split_list(c.methods) == ['pca', 'anogan', 'ae', 'unet', 'pi_model', 'mean_teacher', 'ae_unet']
  if 'seeds=4' in arg:
    assert c.seeds == '4' and c.batch_size == 2
  if arg.startswith('mvtec'):
    assert len(grid.split_list(c.categories)) == 15
  c.methods = 'ae,unet'  # what --config.methods=ae,unet sets


def test_anogans_figure_reconstruction_is_the_one_its_scores_came_from(tmp_path):
  """AnoGAN searches once per image: Figure 6's stored reconstruction and scores of a cell agree, i.e.
  each score is the channel reduction (config.model.diff_channels) of |I - that reconstruction|,
  recomputed here with numpy (to the uint8 / float16 storage's rounding). A second search from other
  starting draws gives another reconstruction, which would not match."""
  c = smoke_config()
  c.methods, c.ablations = 'anogan', False
  result = reproduce.reproduce(c, str(tmp_path), progress=False)
  assert result.cells_run == ['washer/seed0/anogan'] and not result.cells_failed
  maps = np.load(tmp_path / 'washer' / 'seed0' / 'anogan' / 'figure_maps.npz')
  images = np.load(tmp_path / 'washer' / 'figure_inputs.npz')['images'].astype(np.float64) / 255
  diff = np.abs(images - maps['reconstruction'].astype(np.float64) / 255)
  expect = diff.max(-1) if c.model.diff_channels == 'max' else diff.mean(-1)
  np.testing.assert_allclose(maps['scores'].astype(np.float64), expect, atol=1.5 / 255)


# ----------------------------------------------------------------------------------------------
# Shards, local workers, collecting.

LAYOUT_GRID = dict(categories='washer,brick', methods='ae,unet,ae_unet', seeds='0', ablations=False)


def layout_config(**keys):
  c = smoke_config()
  for k, v in {**LAYOUT_GRID, **keys}.items():
    c[k] = v
  return c


def comparable(rows: list[dict]) -> dict:
  """{(category, method, variant, seed, split): metrics} without ms_per_image (a timing, never repeated)."""
  return {tuple(r[k] for k in report.KEY_COLUMNS[1:]): {k: v for k, v in r.items() if k != 'ms_per_image'}
          for r in rows}


def two_workers_job(tmp_path_factory, background):
  """The layout grid run by ``--config.workers=2``: shards 0/2 and 1/2 as two processes at once on one
  workdir. Its datasets are built here, the child started when the session's background thread comes
  to it (conftest.Background)."""
  from semiseg.data import pipeline
  root = str(tmp_path_factory.mktemp('workers'))
  config = layout_config()
  for category in grid.split_list(config.categories):  # built once, before the workers read them
    cell = grid.cell_config(config, grid.Cell('synthetic_defects', category, 0, 'ae'), root)
    pipeline.load_category(cell.data, None)
  args = ['--config', 'configs/reproduce.py:synthetic,smoke', '--workdir', root, '--config.workers=2']
  args += [f'--config.{k}={str(v).lower()}' for k, v in LAYOUT_GRID.items()]
  env = dict(os.environ, JAX_PLATFORMS='cpu', TQDM_DISABLE='1')
  env['SEMISEG_JAX_CACHE'] = os.environ['SEMISEG_TEST_JAX_CACHE']

  def run():
    done = background.run([sys.executable, '-m', 'experiments.reproduce'] + args, cwd=ROOT, env=env,
                          timeout=480)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root
  return run


BACKGROUND_JOBS = {'two_workers': two_workers_job}


@pytest.fixture(scope='module')
def two_workers(background, tmp_path_factory):
  """The layout grid by two local workers (``two_workers_job``); and the same grid's brick cells run
  here in one process (washer's: the module's ``repro``)."""
  root = background.result('two_workers', two_workers_job, tmp_path_factory)
  one = str(tmp_path_factory.mktemp('one_process'))
  reproduce.reproduce(layout_config(categories='brick'), one, progress=False)
  return root, one


def test_two_workers_give_the_numbers_of_one_process(two_workers, repro):
  root, one = two_workers
  rows = comparable(report.read_csv(os.path.join(root, 'results.csv')))
  reference = comparable(report.read_csv(os.path.join(repro[0], 'results.csv'))
                         + report.read_csv(os.path.join(one, 'results.csv')))
  assert {k[:2] for k in rows} == {(c, m) for c in ('washer', 'brick') for m in ('ae', 'unet', 'ae_unet')}
  for key, row in rows.items():
    assert row == reference[key], key  # to the digit
  for i in (0, 1):
    log = open(os.path.join(root, 'workers', f'worker{i}.log')).read()
    assert f'Shard {i}/2: 3 cell(s) run' in log


def test_a_collecting_call_writes_the_full_report_training_nothing(two_workers, monkeypatch):
  root, _ = two_workers
  before = open(os.path.join(root, 'results.csv')).read()
  for name in ('report.md', 'results.csv'):
    os.remove(os.path.join(root, name))

  def no_training(*args, **kwargs):
    raise AssertionError('a collecting call trained')
  monkeypatch.setattr(train, 'train', no_training)
  got = reproduce.reproduce(layout_config(workers=0), root, progress=False)
  assert got.cells_run == [] and got.cells_missing == [] and len(got.cells_skipped) == 6
  assert open(os.path.join(root, 'results.csv')).read() == before
  text = open(got.report_path).read()
  assert 'not finished' not in text and '](figures/fig6_brick.png)' in text
  # A shard of several trains nothing here (finished) and writes no report, while another run holds
  # the other shard's group (the lock covers a shard, not the grid).
  os.remove(got.report_path)
  with fileio.workdir_lock(grid.group_dir(root, ('washer', 0))):
    shard = reproduce.reproduce(layout_config(shard='1/2'), root, progress=False)
    assert shard.report_path is None and shard.cells_run == [] and len(shard.cells_skipped) == 3
    with pytest.raises(RuntimeError, match='Another run'):
      reproduce.reproduce(layout_config(shard='0/2'), root, progress=False)
  assert not os.path.exists(got.report_path)
  # A cell gone: the collecting call names it, in its result and in report.md.
  cell = os.path.join(root, 'washer', 'seed0', 'unet')
  shutil.move(os.path.join(cell, 'eval.json'), os.path.join(cell, 'eval.json.away'))
  try:
    got = reproduce.reproduce(layout_config(workers=0), root, progress=False)
  finally:
    shutil.move(os.path.join(cell, 'eval.json.away'), os.path.join(cell, 'eval.json'))
  assert got.cells_missing == ['washer/seed0/unet']
  assert '1 of 6 cells not finished' in open(got.report_path).read()


def test_a_stale_cell_trains_afresh_and_its_old_workdir_is_kept_aside(tmp_path, monkeypatch):
  """A cell whose config changed does not resume the other config's finished checkpoints (it would only
  be evaluated again): its workdir moves to <wd>.stale-<old fingerprint> and the cell trains from step 0."""
  config = smoke_config()
  config.methods, config.ablations = 'unet', False
  resumed = []
  real_train = train.train

  def recording_train(*args, **kwargs):
    result = real_train(*args, **kwargs)
    resumed.append(result.resumed_from)
    return result
  monkeypatch.setattr(train, 'train', recording_train)
  root = str(tmp_path)
  reproduce.reproduce(config, root, progress=False)
  wd = os.path.join(root, 'washer', 'seed0', 'unet')
  old_fp = json.load(open(os.path.join(wd, 'eval.json')))['reproduce']['fingerprint']
  assert json.load(open(os.path.join(wd, reproduce.CELL_FILE))) == {'fingerprint': old_fp}
  config.optim.learning_rate *= 2  # the same shapes: the old checkpoints would load and be resumed
  again = reproduce.reproduce(config, root, progress=False)
  assert again.cells_run == ['washer/seed0/unet'] and resumed == [None, None]
  new_fp = json.load(open(os.path.join(wd, 'eval.json')))['reproduce']['fingerprint']
  assert new_fp != old_fp
  aside = f'{wd}.stale-{old_fp}'
  assert json.load(open(os.path.join(aside, 'eval.json')))['reproduce']['fingerprint'] == old_fp
