"""reproduce end to end on a smoke config: CSV columns, every table, figures; a rerun trains nothing."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from scipy.spatial import distance
from sklearn.metrics import roc_auc_score

from configs import reproduce as reproduce_config
from semiseg import evaluate, fileio, report, reproduce, train

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
  config = reproduce.cell_config(smoke_config(), reproduce.Cell('synthetic_defects', 'washer', 0, 'ae'), root)
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
  cells, _ = reproduce.plan(config)
  other = config.copy_and_resolve_references()
  other.threshold = 0.4
  for c in cells:
    assert reproduce.finished_eval(c.workdir(root), reproduce.fingerprint(reproduce.cell_config(config, c, root)))
    assert not reproduce.finished_eval(c.workdir(root),
                                       reproduce.fingerprint(reproduce.cell_config(other, c, root)))


def test_plan_skips_methods_not_in_the_registry(monkeypatch):
  from semiseg import methods
  monkeypatch.setattr(methods, 'REGISTRY', {k: v for k, v in methods.REGISTRY.items() if k != 'pca'})
  config = smoke_config()
  config.methods = 'pca,unet'
  config.ablations = False
  cells, skipped = reproduce.plan(config)
  assert skipped == ['pca'] and [c.name for c in cells] == ['unet']
  config.methods = 'unet,nonsense'
  with pytest.raises(ValueError, match='nonsense'):
    reproduce.plan(config)


def test_plan_puts_declared_prerequisites_first():
  config = smoke_config()
  config.methods, config.ablations = 'ae_unet,unet', False
  cells, _ = reproduce.plan(config)
  assert [c.name for c in cells] == ['ae', 'unet', 'ae_unet']  # ae_unet declares its AE: a cell of its own


@pytest.mark.parametrize('arg', ['synthetic', 'synthetic,smoke', 'mvtec', 'mvtec,smoke', 'folder,smoke',
                                 'synthetic,smoke,seeds=4,batch_size=2'])
def test_config_loads_and_locks(arg):
  c = reproduce_config.get_config(arg)
  c.lock()
  assert isinstance(c.methods, str) and isinstance(c.seeds, str) and isinstance(c.categories, str)
  assert reproduce.split_list(c.methods) == ['pca', 'anogan', 'ae', 'unet', 'pi_model', 'mean_teacher', 'ae_unet']
  if 'seeds=4' in arg:
    assert c.seeds == '4' and c.batch_size == 2
  if arg.startswith('mvtec'):
    assert len(reproduce.split_list(c.categories)) == 15
  c.methods = 'ae,unet'  # what --config.methods=ae,unet sets


def test_cell_config_sets_category_fields_and_variants(tmp_path):
  config = smoke_config()
  cell = lambda *args: reproduce.cell_config(config, reproduce.Cell('synthetic_defects', *args), str(tmp_path))
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
  cell = lambda m: reproduce.cell_config(config, reproduce.Cell('synthetic_defects', 'washer', 0, m),
                                         str(tmp_path))
  before = {m: reproduce.fingerprint(cell(m)) for m in ('unet', 'pi_model')}
  config.consistency.weight = 3.0
  assert reproduce.fingerprint(cell('unet')) == before['unet']
  assert reproduce.fingerprint(cell('pi_model')) != before['pi_model']


def test_a_unet_setting_keeps_the_ae_pca_and_anogan_cells(tmp_path):
  """model.unet_* keys are read by the U-Net family only: changing one keeps the AE, PCA and AnoGAN
  cells of a grid (their fingerprints) and makes every U-Net method's cell stale."""
  config = smoke_config()
  cell = lambda m: reproduce.cell_config(config, reproduce.Cell('synthetic_defects', 'washer', 0, m),
                                         str(tmp_path))
  names = ('ae', 'pca', 'anogan', 'unet', 'pi_model', 'mean_teacher', 'ae_unet')
  before = {m: reproduce.fingerprint(cell(m)) for m in names}
  config.model.unet_norm = {'group': 'none', 'none': 'group'}[config.model.unet_norm]
  after = {m: reproduce.fingerprint(cell(m)) for m in names}
  assert [m for m in names if after[m] != before[m]] == ['unet', 'pi_model', 'mean_teacher', 'ae_unet']
  config.model.unet_input = 'diff'  # read by ae_unet alone
  assert [m for m in names if reproduce.fingerprint(cell(m)) != after[m]] == ['ae_unet']
  before_gate = {m: reproduce.fingerprint(cell(m)) for m in names}
  config.model.diff_gate = {'trivial': 'none', 'none': 'trivial'}[config.model.diff_gate]  # likewise
  assert [m for m in names if reproduce.fingerprint(cell(m)) != before_gate[m]] == ['ae_unet']


def test_the_ae_cell_does_not_depend_on_the_unets_learning_rate(tmp_path):
  """With ae_learning_rate set, the U-Net family's rate is not the AE's: changing it keeps the AE cell
  (its config trains at ae_learning_rate, and its fingerprint is unchanged), while the U-Net's changes."""
  config = smoke_config()
  config.ae_learning_rate = 2e-3
  cell = lambda m: reproduce.cell_config(config, reproduce.Cell('synthetic_defects', 'washer', 0, m),
                                         str(tmp_path))
  assert cell('ae').optim.learning_rate == 2e-3
  before = {m: reproduce.fingerprint(cell(m)) for m in ('ae', 'unet')}
  config.optim.learning_rate = 4e-3
  assert reproduce.fingerprint(cell('ae')) == before['ae']
  assert reproduce.fingerprint(cell('unet')) != before['unet']
  config.ae_learning_rate = 1e-3
  assert reproduce.fingerprint(cell('ae')) != before['ae']


def test_the_ae_cell_does_not_depend_on_the_unets_schedule(tmp_path):
  """With ae_decay_every_steps set, the U-Net family's decay interval is not the AE's: changing it keeps
  the AE cell, whose optimizer drops x decay_rate every ae_decay_every_steps (by hand below); a
  non-positive value names the key."""
  from semiseg.methods import autoencoder, base
  config = smoke_config()
  config.ae_decay_every_steps = 3
  cell = lambda m: reproduce.cell_config(config, reproduce.Cell('synthetic_defects', 'washer', 0, m),
                                         str(tmp_path))
  assert cell('ae').optim.decay_every_steps == 3
  before = {m: reproduce.fingerprint(cell(m)) for m in ('ae', 'unet')}
  config.optim.decay_every_steps = 7
  assert reproduce.fingerprint(cell('ae')) == before['ae']
  assert reproduce.fingerprint(cell('unet')) != before['unet']
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
  cell = reproduce.Cell('synthetic_defects', 'gravel', 1, 'ae_unet')
  gate = {'rule': 'trivial', 'open': False, 'd_auroc_labeled': 0.5217, 'trivial_auroc_labeled': 0.5559}
  (note,) = reproduce.cell_notes(cell, {'diff_gate': gate})
  assert note.startswith('gravel/seed1/ae_unet: D entered the U-Net as zeros') and '0.522' in note and '0.556' in note
  assert reproduce.cell_notes(cell, {'diff_gate': {**gate, 'open': True}}) == []
  (note,) = reproduce.cell_notes(cell, {'health': {'collapsed': True, 'warnings': ['the loss ended at 0.2']}})
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
