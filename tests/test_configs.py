"""Every config file and each documented :arg loads, locks and takes overrides of the right type."""

import pytest
from ml_collections import config_dict

from configs import common, folder, mvtec, synthetic

ARGS = [
    (synthetic, None), (synthetic, 'smoke'), (synthetic, 'paper'), (synthetic, 'washer,method=unet,smoke'),
    *[(synthetic, c) for c in common.SYNTHETIC_CATEGORIES],
    (mvtec, None), (mvtec, 'smoke'), *[(mvtec, c) for c in common.MVTEC_CATEGORIES],
    (mvtec, 'carpet,method=unet'), (folder, None), (folder, 'smoke'), (folder, 'cpu,texture=true'),
]


@pytest.mark.parametrize('module,arg', ARGS)
def test_loads_and_locks(module, arg):
  c = module.get_config(arg)
  c.lock()
  assert c.method in common.METHODS
  with pytest.raises((AttributeError, KeyError)):
    c.no_such_key = 1
  c.seed = 3  # existing keys stay settable


def test_textures_are_marked_and_reflected():
  assert mvtec.get_config('carpet').data.texture and mvtec.get_config('carpet').augment.border == 'reflect'
  assert not mvtec.get_config('bottle').data.texture
  assert synthetic.get_config('grass').data.texture and not synthetic.get_config('pcb').data.texture


def test_flips_off_where_a_mirror_is_a_defect():
  # metal_nut's defect type 'flip' is what a mirrored good nut looks like; cable's 'cable_swap' too.
  for category in ('metal_nut', 'cable', 'capsule', 'pill', 'transistor'):
    c = mvtec.get_config(category)
    assert not c.augment.flip_x and not c.augment.flip_y, category
  assert mvtec.get_config('toothbrush').augment.flip_x and not mvtec.get_config('toothbrush').augment.flip_y
  assert mvtec.get_config('bottle').augment.flip_x and mvtec.get_config('carpet').augment.flip_y
  assert set(common.MVTEC_FLIPS) == set(common.MVTEC_CATEGORIES)


def test_the_split_is_the_papers_by_default():
  for c in (synthetic.get_config(), mvtec.get_config('bottle'), folder.get_config('cpu')):
    assert (c.data.split, c.data.k_labeled, c.data.test_to_unlabeled) == ('paper', 1, 2)


def test_paper_settings():
  c = mvtec.get_config('bottle')
  assert (c.data.image_size, c.batch_size, c.num_epochs, c.model.latent_dim) == (256, 16, 200, 16 * 0 + 500)
  assert (c.optim.learning_rate, c.optim.decay_rate, c.optim.decay_every_epochs) == (1e-4, 0.8, 30)
  assert (c.model.unet_features, c.model.unet_depth) == (64, 4)


def test_arg_pairs_are_typed_and_checked():
  assert synthetic.get_config('num_train_steps=7').num_train_steps == 7
  assert synthetic.get_config('optim.learning_rate=0.5').optim.learning_rate == 0.5
  with pytest.raises(ValueError, match='unknown config key'):
    synthetic.get_config('nope=1')
  with pytest.raises(ValueError, match='not a valid int'):
    synthetic.get_config('batch_size=many')
  with pytest.raises(ValueError, match='unknown arg word'):
    mvtec.get_config('bottel')


def test_placeholders_accept_overrides():
  c = synthetic.get_config()
  c.lock()
  c.data.root = '/some/where'
  c.ae_workdir = '/x'
  with pytest.raises(TypeError):
    c.batch_size = 'x'
  assert isinstance(c.data, config_dict.ConfigDict)
