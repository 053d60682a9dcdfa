"""The datasets' categories and what follows from a category: texture handling, warp border, flips.

A config leaves ``data.texture``, ``augment.border``, ``augment.flip_x`` and ``augment.flip_y`` unset
(None) and the category decides them, wherever the category was set (``configs/mvtec.py:carpet`` or
``--config.data.category=carpet``): ``apply_category_rules`` fills them where a config enters the
library (semiseg.run.resolve, the reproduce grid's cells), ``settings`` reads them for one config.
A value set by hand that contradicts the category's rule is an error that names the key. The
``folder`` dataset (a user's own categories) has no rules: ``data.texture`` is the user's (default
False), the border follows it, flips default to on.
"""

from __future__ import annotations

import copy
import dataclasses

# MVTec AD's texture categories: kept at 2x the working size, warped, cropped (paper 3.3).
MVTEC_TEXTURES = ('carpet', 'grid', 'leather', 'tile', 'wood')
MVTEC_OBJECTS = ('bottle', 'cable', 'capsule', 'hazelnut', 'metal_nut', 'pill', 'screw',
                 'toothbrush', 'transistor', 'zipper')
MVTEC_CATEGORIES = ('bottle', 'cable', 'capsule', 'carpet', 'grid', 'hazelnut', 'leather',
                    'metal_nut', 'pill', 'screw', 'tile', 'toothbrush', 'transistor', 'wood',
                    'zipper')
# Flips where they do not change what counts as normal ("wherever possible", paper 3.3), per axis:
# (flip_x = left-right mirror, flip_y = up-down). Both for textures and for objects that lie in any
# orientation (bottle, hazelnut, screw). Off where a mirror image is a defect or never normal:
#   metal_nut  - its defect type 'flip' is the nut upside down, which is what a mirrored good nut shows;
#   cable      - a mirror swaps two of the three coloured cables: the defect type 'cable_swap';
#   capsule, pill - the printed '500' / 'FF' would read mirrored, like 'faulty_imprint';
#   transistor - an up-down flip puts the leads on top, like 'misplaced'; left-right kept off too (its
#                defects are about position);
#   toothbrush, zipper - upright in every image: left-right only.
MVTEC_FLIPS = {c: (True, True) for c in MVTEC_TEXTURES + ('bottle', 'hazelnut', 'screw')}
MVTEC_FLIPS.update({c: (False, False) for c in ('metal_nut', 'cable', 'capsule', 'pill', 'transistor')})
MVTEC_FLIPS.update({c: (True, False) for c in ('toothbrush', 'zipper')})

SYNTHETIC_TEXTURES = ('brick', 'grass', 'gravel')
SYNTHETIC_OBJECTS = ('washer', 'pcb')
SYNTHETIC_CATEGORIES = SYNTHETIC_TEXTURES + SYNTHETIC_OBJECTS

# Datasets with known categories (the TFDS builders'); 'folder' is not among them.
CATEGORIES = {'mvtec_ad': MVTEC_CATEGORIES, 'synthetic_defects': SYNTHETIC_CATEGORIES}
TEXTURES = {'mvtec_ad': MVTEC_TEXTURES, 'synthetic_defects': SYNTHETIC_TEXTURES}


@dataclasses.dataclass(frozen=True)
class Settings:
  """What follows from a category."""
  texture: bool  # kept at 2x, warped and cropped for training, tiled for evaluation (paper 3.3)
  border: str  # warp fill outside the image: 'reflect' for textures, 'constant' (zeros) for objects
  flip_x: bool  # random left-right mirror
  flip_y: bool  # random up-down mirror


# (config group, key) of each field of Settings.
_KEYS = {'texture': ('data', 'texture'), 'border': ('augment', 'border'), 'flip_x': ('augment', 'flip_x'),
         'flip_y': ('augment', 'flip_y')}


def border_for(texture: bool) -> str:
  return 'reflect' if texture else 'constant'


def rules(dataset: str, category: str) -> Settings | None:
  """The settings of a category of a known dataset; None for datasets without rules ('folder')."""
  if dataset not in CATEGORIES:
    return None
  if category not in CATEGORIES[dataset]:
    raise ValueError(f'config.data.category={category!r} is not a category of {dataset}; choose one of '
                     f'{", ".join(CATEGORIES[dataset])}.')
  texture = category in TEXTURES[dataset]
  flip_x, flip_y = MVTEC_FLIPS[category] if dataset == 'mvtec_ad' else (True, True)
  return Settings(texture=texture, border=border_for(texture), flip_x=flip_x, flip_y=flip_y)


def _given(config, field: str):
  group, key = _KEYS[field]
  return config[group].get(key) if group in config else None


def _check(field: str, value, rule, data_config) -> None:
  if value is not None and value != rule:
    group, key = _KEYS[field]
    raise ValueError(f'config.{group}.{key}={value!r} contradicts category {data_config.category!r} of '
                     f'{data_config.name} ({key}={rule!r} there); leave config.{group}.{key} unset to '
                     'follow the category, or use the folder dataset for other settings.')


def texture(data_config) -> bool:
  """``data.texture`` of a ``config.data``: the category's rule (a value set by hand must agree), or
  for 'folder' the value set (default False)."""
  r = rules(data_config.name, data_config.category)
  given = data_config.get('texture')
  if r is None:
    return bool(given)
  _check('texture', given, r.texture, data_config)
  return r.texture


def settings(config) -> Settings:
  """The texture, border and flips of a config: its category's rules (values set by hand must agree);
  for 'folder', the values set, else texture False, the border that follows it and both flips."""
  r = rules(config.data.name, config.data.category)
  if r is None:
    t = bool(_given(config, 'texture'))
    defaults = Settings(texture=t, border=border_for(t), flip_x=True, flip_y=True)
    return Settings(**{f: getattr(defaults, f) if _given(config, f) is None else _given(config, f)
                       for f in _KEYS})
  for field in _KEYS:
    _check(field, _given(config, field), getattr(r, field), config.data)
  return r


def apply_category_rules(config):
  """A copy of ``config`` with ``data.texture``, ``augment.border`` and the flips set (see ``settings``)."""
  s = settings(config)
  out = copy.deepcopy(config)
  for field, (group, key) in _KEYS.items():
    out[group][key] = getattr(s, field)
  return out
