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
from semiseg import evaluate, fileio, grid, grid_report, report, reproduce, train, workers

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


def test_plan_skips_methods_not_in_the_registry(monkeypatch):
  from semiseg import methods
  monkeypatch.setattr(methods, 'REGISTRY', {k: v for k, v in methods.REGISTRY.items() if k != 'pca'})
  config = smoke_config()
  config.methods = 'pca,unet'
  config.ablations = False
  cells, skipped = grid.plan(config)
  assert skipped == ['pca'] and [c.name for c in cells] == ['unet']
  config.methods = 'unet,nonsense'
  with pytest.raises(ValueError, match='nonsense'):
    grid.plan(config)


def test_plan_puts_declared_prerequisites_first():
  config = smoke_config()
  config.methods, config.ablations = 'ae_unet,unet', False
  cells, _ = grid.plan(config)
  assert [c.name for c in cells] == ['ae', 'unet', 'ae_unet']  # ae_unet declares its AE: a cell of its own


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


def test_cell_config_sets_category_fields_and_variants(tmp_path):
  config = smoke_config()
  cell = lambda *args: grid.cell_config(config, grid.Cell('synthetic_defects', *args), str(tmp_path))
  brick, washer = cell('brick', 1, 'unet', 'no_aug'), cell('washer', 1, 'ae_unet', 'diff')
  assert brick.data.texture and not washer.data.texture and brick.augment.border == 'reflect'
  assert not brick.augment.enabled and brick.seed == 1 and brick.data.split_seed == config.data.split_seed
  assert washer.model.unet_input == 'diff' and washer.ae_workdir == str(tmp_path / 'washer' / 'seed1' / 'ae')
  assert 'methods' not in washer
  config.ae_num_train_steps, config.ae_batch_size = 7, 6
  ae = cell('washer', 0, 'ae')
  assert ae.method == 'ae' and ae.num_train_steps == 7 and ae.batch_size == 6  # the AE ae_unet reuses
  assert cell('washer', 0, 'ae_unet').batch_size == config.batch_size != 6
  config.ae_batch_size = 0
  with pytest.raises(ValueError, match=r'config.ae_batch_size must be a positive'):
    cell('washer', 0, 'ae')


def test_fingerprint_ignores_other_methods_groups(tmp_path):
  config = smoke_config()
  cell = lambda m: grid.cell_config(config, grid.Cell('synthetic_defects', 'washer', 0, m),
                                         str(tmp_path))
  before = {m: grid.fingerprint(cell(m)) for m in ('unet', 'pi_model')}
  config.consistency.weight = 3.0
  assert grid.fingerprint(cell('unet')) == before['unet']
  assert grid.fingerprint(cell('pi_model')) != before['pi_model']


def test_a_unet_setting_keeps_the_ae_pca_and_anogan_cells(tmp_path):
  """model.unet_* keys are read by the U-Net family only: changing one keeps the AE, PCA and AnoGAN
  cells of a grid (their fingerprints) and makes every U-Net method's cell stale."""
  config = smoke_config()
  cell = lambda m: grid.cell_config(config, grid.Cell('synthetic_defects', 'washer', 0, m),
                                         str(tmp_path))
  names = ('ae', 'pca', 'anogan', 'unet', 'pi_model', 'mean_teacher', 'ae_unet')
  before = {m: grid.fingerprint(cell(m)) for m in names}
  config.model.unet_norm = {'group': 'none', 'none': 'group'}[config.model.unet_norm]
  after = {m: grid.fingerprint(cell(m)) for m in names}
  assert [m for m in names if after[m] != before[m]] == ['unet', 'pi_model', 'mean_teacher', 'ae_unet']
  config.model.unet_input = 'diff'  # read by ae_unet alone
  assert [m for m in names if grid.fingerprint(cell(m)) != after[m]] == ['ae_unet']
  before_gate = {m: grid.fingerprint(cell(m)) for m in names}
  config.model.diff_gate = {'trivial': 'none', 'none': 'trivial'}[config.model.diff_gate]  # likewise
  assert [m for m in names if grid.fingerprint(cell(m)) != before_gate[m]] == ['ae_unet']


def test_the_ae_cell_does_not_depend_on_the_unets_learning_rate(tmp_path):
  """With ae_learning_rate set, the U-Net family's rate is not the AE's: changing it keeps the AE cell
  (its config trains at ae_learning_rate, and its fingerprint is unchanged), while the U-Net's changes."""
  config = smoke_config()
  config.ae_learning_rate = 2e-3
  cell = lambda m: grid.cell_config(config, grid.Cell('synthetic_defects', 'washer', 0, m),
                                         str(tmp_path))
  assert cell('ae').optim.learning_rate == 2e-3
  before = {m: grid.fingerprint(cell(m)) for m in ('ae', 'unet')}
  config.optim.learning_rate = 4e-3
  assert grid.fingerprint(cell('ae')) == before['ae']
  assert grid.fingerprint(cell('unet')) != before['unet']
  config.ae_learning_rate = 1e-3
  assert grid.fingerprint(cell('ae')) != before['ae']


def test_the_ae_cell_does_not_depend_on_the_unets_schedule(tmp_path):
  """With ae_decay_every_steps set, the U-Net family's decay interval is not the AE's: changing it keeps
  the AE cell, whose optimizer drops x decay_rate every ae_decay_every_steps (by hand below); a
  non-positive value names the key."""
  from semiseg.methods import autoencoder, base
  config = smoke_config()
  config.ae_decay_every_steps = 3
  cell = lambda m: grid.cell_config(config, grid.Cell('synthetic_defects', 'washer', 0, m),
                                         str(tmp_path))
  assert cell('ae').optim.decay_every_steps == 3
  before = {m: grid.fingerprint(cell(m)) for m in ('ae', 'unet')}
  config.optim.decay_every_steps = 7
  assert grid.fingerprint(cell('ae')) == before['ae']
  assert grid.fingerprint(cell('unet')) != before['unet']
  ctx = base.MethodContext(image_size=32, texture=False, steps_per_epoch=1000)
  direct = config.copy_and_resolve_references()  # the AE trained on its own: experiments.train, method=ae
  direct.method = 'ae'
  for ae_config in (cell('ae'), direct):
    tx = autoencoder.create(ae_config, ctx).train_step.keywords['tx']
    params = {'w': np.zeros(())}
    state, lr = tx.init(params), []
    for _ in range(7):  # Adam's update of a constant unit gradient is the rate itself
      upd, state = tx.update({'w': np.ones(())}, state, params)
      lr.append(-float(upd['w']))
    rate = float(ae_config.ae_learning_rate or ae_config.optim.learning_rate)
    np.testing.assert_allclose(lr[:3], [rate] * 3, rtol=1e-3)
    np.testing.assert_allclose(lr[3:6], [rate * config.optim.decay_rate] * 3, rtol=1e-3)
  config.ae_decay_every_steps = 0
  with pytest.raises(ValueError, match='config.ae_decay_every_steps'):
    cell('ae')


def test_report_notes_name_a_collapsed_training_and_a_closed_difference_gate():
  cell = grid.Cell('synthetic_defects', 'gravel', 1, 'ae_unet')
  gate = {'rule': 'trivial', 'open': False, 'd_auroc_labeled': 0.5217, 'trivial_auroc_labeled': 0.5559}
  (note,) = grid_report.cell_notes(cell, {'diff_gate': gate})
  assert note.startswith('gravel/seed1/ae_unet: D entered the U-Net as zeros') and '0.522' in note and '0.556' in note
  assert grid_report.cell_notes(cell, {'diff_gate': {**gate, 'open': True}}) == []
  (note,) = grid_report.cell_notes(cell, {'health': {'collapsed': True, 'warnings': ['the loss ended at 0.2']}})
  assert 'training collapsed (the loss ended at 0.2)' in note


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


@pytest.mark.parametrize('arg,n', [('synthetic', 2), ('synthetic', 3), ('mvtec', 8), ('mvtec,seeds=0', 4)])
def test_shards_cover_the_grid_once_with_category_seed_groups_intact(arg, n):
  cells, _ = grid.plan(reproduce_config.get_config(arg))
  shards = [grid.shard_cells(cells, i, n) for i in range(n)]
  every = [c for s in shards for c in s]
  assert len(every) == len(cells) and set(every) == set(cells)  # every cell, once
  for s in shards:  # an AE and every cell of its (category, seed) in the same shard, the grid's order kept
    assert s == [c for c in cells if grid.group_key(c) in {grid.group_key(x) for x in s}]
  sizes = [len(s) for s in shards]
  group = max(map(len, grid.groups(cells).values()))
  assert max(sizes) - min(sizes) <= group and min(sizes) > 0
  assert grid.assign_shards(cells, n) == grid.assign_shards(list(cells), n)  # a pure function of the grid
  if arg == 'mvtec' and n == 8:  # 45 groups of 9 cells
    assert sorted(sizes) == [45, 45, 45, 54, 54, 54, 54, 54]


@pytest.mark.parametrize('text', ['2/2', '1', 'a/b', '0/0', '-1/2'])
def test_a_bad_shard_names_the_key(text):
  with pytest.raises(ValueError, match='config.shard'):
    grid.parse_shard(text)


def test_the_layout_keys_are_not_in_a_cells_fingerprint(tmp_path):
  config = layout_config()
  cell = grid.Cell('synthetic_defects', 'washer', 0, 'ae_unet')
  fp = grid.fingerprint(grid.cell_config(config, cell, str(tmp_path)))
  config.shard, config.workers = '1/4', 3
  assert grid.fingerprint(grid.cell_config(config, cell, str(tmp_path))) == fp


def test_fingerprints_from_the_methods_declarations_equal_the_former_table(tmp_path):
  """The grid's fingerprints come from each method's config_keys; they are those of the hand-kept table
  they replace (reproduce.py's _METHOD_GROUPS, less the keys the config no longer has), so the cells of
  an existing grid stay finished; and a U-Net key still keeps the AE, PCA and AnoGAN cells."""
  import hashlib
  family = ('unet', 'pi_model', 'mean_teacher', 'ae_unet')
  former = {'pca': ('pca',), 'anogan': ('anogan',), 'consistency': ('pi_model', 'mean_teacher'),
            **{f'model.unet_{k}': family for k in ('features', 'depth', 'norm')},
            'model.unet_input': ('ae_unet',), 'model.diff_gate': ('ae_unet',),
            'synth': family}  # config.synth came later (issue 33), read by the U-Net family only

  def former_fingerprint(c):
    d = json.loads(c.to_json_best_effort())
    ignored = (grid._NOT_FINGERPRINTED + grid._prerequisite_keys(c)
               + tuple(g for g, users in former.items() if c.method not in users))
    for key in ignored:
      node = d
      *parents, leaf = key.split('.')
      for p in parents:
        node = node.get(p, {})
      node.pop(leaf, None)
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

  config = smoke_config()
  names = ('ae', 'pca', 'anogan', 'unet', 'pi_model', 'mean_teacher', 'ae_unet')
  cells = [grid.Cell('synthetic_defects', 'washer', 0, m) for m in names]
  cells += [grid.Cell('synthetic_defects', 'brick', 1, 'unet', 'no_aug'),
            grid.Cell('synthetic_defects', 'brick', 1, 'ae_unet', 'diff')]
  for c in cells:
    run = grid.cell_config(config, c, str(tmp_path))
    assert grid.fingerprint(run) == former_fingerprint(run), c
  declared = grid.method_config_keys()
  assert declared['ae'] == () and 'anogan' in declared['anogan'] and 'consistency' in declared['pi_model']
  assert {m for m, keys in declared.items() if 'model.unet_norm' in keys} == set(family)


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
