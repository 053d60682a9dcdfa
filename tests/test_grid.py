"""The grid of cells: its plan, each cell's config and fingerprint (which keys a cell trains for), shards."""

import hashlib
import json

import numpy as np
import pytest

from configs import reproduce as reproduce_config
from semiseg import grid, methods
from semiseg.methods import autoencoder, base
from tests.test_reproduce import layout_config, smoke_config


def test_plan_skips_methods_not_in_the_registry(monkeypatch):
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
