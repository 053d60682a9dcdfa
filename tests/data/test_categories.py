"""The rules that follow from a category (texture, border, flips), however the category was set."""

import pytest

from configs.common import get_base_config
from semiseg.data import categories, pipeline
from semiseg.methods import base


def config(name, category, **settings):
  c = get_base_config()
  c.data.name, c.data.category = name, category
  for key, value in settings.items():
    group, leaf = key.split('.')
    c[group][leaf] = value
  return c


@pytest.mark.parametrize('category', categories.MVTEC_CATEGORIES)
def test_every_mvtec_category_has_its_rules(category):
  s = categories.settings(config('mvtec_ad', category))
  assert s.texture == (category in ('carpet', 'grid', 'leather', 'tile', 'wood'))
  assert s.border == ('reflect' if s.texture else 'constant')
  assert (s.flip_x, s.flip_y) == categories.MVTEC_FLIPS[category]


def test_synthetic_rules_and_unknown_categories():
  settings = lambda category: categories.settings(config('synthetic_defects', category))
  assert settings('gravel') == categories.Settings(True, 'reflect', True, True)
  assert settings('pcb') == categories.Settings(False, 'constant', True, True)
  with pytest.raises(ValueError, match=r"config\.data\.category='carpet' is not a category of synthetic_defects"):
    categories.settings(config('synthetic_defects', 'carpet'))


def test_folder_takes_the_users_settings():
  assert categories.settings(config('folder', 'bracket')) == categories.Settings(False, 'constant', True, True)
  textured = categories.settings(config('folder', 'bracket', **{'data.texture': True, 'augment.flip_y': False}))
  assert textured == categories.Settings(True, 'reflect', True, False)
  assert categories.settings(config('folder', 'x', **{'augment.border': 'edge'})).border == 'edge'


def test_apply_fills_a_copy_and_agrees_with_an_explicit_value():
  c = config('mvtec_ad', 'wood')
  resolved = categories.apply_category_rules(c)
  assert c.data.texture is None and c.augment.border is None  # the caller's config is left as it was
  assert (resolved.data.texture, resolved.augment.border) == (True, 'reflect')
  assert categories.apply_category_rules(resolved).to_dict() == resolved.to_dict()  # idempotent
  with pytest.raises(ValueError, match=r'config\.augment\.flip_y=True contradicts category .zipper.'):
    categories.settings(config('mvtec_ad', 'zipper', **{'augment.flip_y': True}))


def test_the_data_and_the_warp_follow_the_category_of_an_unresolved_config():
  c = config('mvtec_ad', 'carpet')
  c.data.image_size = 64
  assert pipeline.DataSpec.from_config(c.data).stored_size == 128  # a texture: kept at 2x
  spec = base.augment_spec(c, base.MethodContext(image_size=64, texture=True, steps_per_epoch=1))
  assert (spec.border, spec.flip_x, spec.flip_y, spec.crop_size) == ('reflect', True, True, 64)
  with pytest.raises(ValueError, match=r'config\.data\.texture=False contradicts'):
    pipeline.DataSpec.from_config(config('mvtec_ad', 'carpet', **{'data.texture': False}).data)
