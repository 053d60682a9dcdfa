"""Every config file and each documented :arg loads, locks and takes overrides of the right type."""

import os

import pytest
from absl import flags
from ml_collections import config_dict, config_flags

from configs import folder, mvtec, synthetic
from semiseg.methods import METHODS
from semiseg.data.categories import (MVTEC_CATEGORIES, MVTEC_FLIPS, SYNTHETIC_CATEGORIES,
                                     apply_category_rules)

# ml_collections loads config files with importlib's deprecated load_module().
pytestmark = pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')

ARGS = [
    (synthetic, None), (synthetic, 'smoke'), (synthetic, 'paper'), (synthetic, 'washer,method=unet,smoke'),
    *[(synthetic, c) for c in SYNTHETIC_CATEGORIES],
    (mvtec, None), (mvtec, 'smoke'), *[(mvtec, c) for c in MVTEC_CATEGORIES],
    (mvtec, 'carpet,method=unet'), (folder, None), (folder, 'smoke'), (folder, 'cpu,texture=true'),
    (mvtec, 'bottle,recipe=semiseg'), (mvtec, 'cpu,recipe=semiseg'), (folder, 'cpu,recipe=paper'),
    (synthetic, 'paper,recipe=paper'),
]


@pytest.mark.parametrize('module,arg', ARGS)
def test_loads_and_locks(module, arg):
  c = module.get_config(arg)
  c.lock()
  assert c.method in METHODS
  with pytest.raises((AttributeError, KeyError)):
    c.no_such_key = 1
  c.seed = 3  # existing keys stay settable


def resolved(module, arg):
  return apply_category_rules(module.get_config(arg))


def test_textures_are_marked_and_reflected():
  assert resolved(mvtec, 'carpet').data.texture and resolved(mvtec, 'carpet').augment.border == 'reflect'
  assert not resolved(mvtec, 'bottle').data.texture and resolved(mvtec, 'bottle').augment.border == 'constant'
  assert resolved(synthetic, 'grass').data.texture and not resolved(synthetic, 'pcb').data.texture
  assert resolved(folder, 'texture=true').augment.border == 'reflect' and not resolved(folder, None).data.texture


def test_flips_off_where_a_mirror_is_a_defect():
  # metal_nut's defect type 'flip' is what a mirrored good nut looks like; cable's 'cable_swap' too.
  for category in ('metal_nut', 'cable', 'capsule', 'pill', 'transistor'):
    c = resolved(mvtec, category)
    assert not c.augment.flip_x and not c.augment.flip_y, category
  assert resolved(mvtec, 'toothbrush').augment.flip_x and not resolved(mvtec, 'toothbrush').augment.flip_y
  assert resolved(mvtec, 'bottle').augment.flip_x and resolved(mvtec, 'carpet').augment.flip_y


def parse_flags(*argv):
  """``--config`` through absl and ml_collections' config_flags, as the entry points parse it."""
  argv = ['prog', *argv]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config file', flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


MVTEC_FILE = os.path.join(os.path.dirname(mvtec.__file__), 'mvtec.py')


def test_category_set_on_the_command_line_brings_its_texture_border_and_flips():
  carpet = apply_category_rules(parse_flags(f'--config={MVTEC_FILE}', '--config.data.category=carpet'))
  assert carpet.data.category == 'carpet' and carpet.data.texture is True
  assert carpet.augment.border == 'reflect'
  assert (carpet.augment.flip_x, carpet.augment.flip_y) == MVTEC_FLIPS['carpet'] == (True, True)
  cable = apply_category_rules(parse_flags(f'--config={MVTEC_FILE}:carpet', '--config.data.category=cable'))
  assert (cable.data.texture, cable.augment.border, cable.augment.flip_x, cable.augment.flip_y) == (
      False, 'constant', False, False)


@pytest.mark.parametrize('override,key', [('--config.data.texture=false', 'config.data.texture'),
                                          ('--config.augment.border=constant', 'config.augment.border'),
                                          ('--config.augment.flip_x=false', 'config.augment.flip_x')])
def test_a_setting_that_contradicts_the_category_is_an_error_naming_the_key(override, key):
  config = parse_flags(f'--config={MVTEC_FILE}', '--config.data.category=carpet', override)
  with pytest.raises(ValueError, match=key.replace('.', r'\.') + '=.* contradicts category .carpet.'):
    apply_category_rules(config)
  agreeing = parse_flags(f'--config={MVTEC_FILE}', '--config.data.category=carpet', '--config.data.texture=true')
  assert apply_category_rules(agreeing).data.texture


def test_the_split_is_the_papers_by_default():
  for c in (synthetic.get_config(), mvtec.get_config('bottle'), folder.get_config('cpu')):
    assert (c.data.k_labeled, c.data.test_to_unlabeled) == (1, 2)


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
  with pytest.raises(ValueError, match=r"unknown arg word\(s\) \['cpux'\]; use one of \('smoke', 'cpu', 'paper'\)"):
    folder.get_config('cpux')  # no category list to offer


def test_placeholders_accept_overrides():
  c = synthetic.get_config()
  c.lock()
  c.data.root = '/some/where'
  c.ae_workdir = '/x'
  with pytest.raises(TypeError):
    c.batch_size = 'x'
  assert isinstance(c.data, config_dict.ConfigDict)


def flat(c, prefix=''):
  out = {}
  for key, value in c.items():
    if isinstance(value, config_dict.ConfigDict):
      out.update(flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


# The keys experiments/results/recipes.md lists as the recipes' difference, with each recipe's value.
RECIPE_KEYS = {
    'model.unet_norm': ('none', 'group'), 'model.ae_bottleneck': ('dense', 'conv'),
    'model.latent_dim': (500, 8), 'model.ae_normalize': ('none', 'image'), 'ae_augment': ('same', 'none'),
    'model.diff_blur': (0.0, 1.0), 'model.diff_channels': ('mean', 'max'), 'model.diff_scale': ('none', 'p99'),
    'model.diff_gate': ('none', 'trivial'), 'anogan.g_ema_decay': (0.0, 0.999),
}


@pytest.mark.parametrize('module,size', [(synthetic, 'cpu'), (synthetic, 'paper'), (mvtec, 'cpu'),
                                         (mvtec, 'paper'), (folder, 'cpu'), (folder, 'paper')])
def test_the_recipes_differ_exactly_in_the_documented_keys(module, size):
  paper = flat(module.get_config(f'{size},recipe=paper'))
  ours = flat(module.get_config(f'{size},recipe=semiseg'))
  differ = {k for k in paper if paper[k] != ours[k]}
  assert differ == set(RECIPE_KEYS) | {'recipe'}
  assert (paper['recipe'], ours['recipe']) == ('paper', 'semiseg')
  for key, (paper_value, our_value) in RECIPE_KEYS.items():
    assert (paper[key], ours[key]) == (paper_value, our_value), key


def test_the_recipe_study_documents_every_recipe_key():
  study = os.path.join(os.path.dirname(__file__), '..', 'experiments', 'results', 'recipes.md')
  text = open(study).read()
  for key in RECIPE_KEYS:
    assert f'`{key}`' in text, key


def test_each_config_files_default_recipe_and_size():
  assert (synthetic.get_config().recipe, synthetic.get_config().data.image_size) == ('semiseg', 64)
  assert (mvtec.get_config().recipe, mvtec.get_config().data.image_size) == ('paper', 256)
  assert (folder.get_config().recipe, folder.get_config().data.image_size) == ('semiseg', 256)
  assert folder.get_config('cpu').data.image_size == 128
  # The recipe leaves the sizes alone, the size the recipe.
  cpu_paper, cpu_ours = flat(mvtec.get_config('cpu,recipe=paper')), flat(mvtec.get_config('cpu'))
  assert cpu_paper['num_train_steps'] == cpu_ours['num_train_steps'] == 800
  assert cpu_paper['ae_learning_rate'] == cpu_ours['ae_learning_rate'] == 1.2e-3


def test_a_bad_recipe_or_size_is_an_error_naming_the_word():
  with pytest.raises(ValueError, match='recipe=.nope. is not a recipe; use recipe=paper or recipe=semiseg'):
    synthetic.get_config('recipe=nope')
  with pytest.raises(ValueError, match='one size word'):
    mvtec.get_config('cpu,paper')
