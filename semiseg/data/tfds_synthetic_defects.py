"""TFDS builder for the embedded synthetic defect set (``synthetic_render.py``); no download, no TensorFlow.

    builder = SyntheticDefects(config='brick', data_dir=...)
    builder.download_and_prepare(file_format='array_record')
    source = builder.as_data_source()  # {'train': ..., 'test': ...}

The tree is generated into a temporary folder (deterministic for the config's seed), read back
with the same tree reader (mvtec_tree.py) as MVTec AD and a user's folder, and deleted when preparation ends.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import weakref

import tensorflow_datasets as tfds

from semiseg.data import mvtec_tree, synthetic_render, tfds_common
from semiseg.data.categories import SYNTHETIC_CATEGORIES, SYNTHETIC_TEXTURES


@dataclasses.dataclass(eq=False)
class SyntheticDefectsConfig(tfds.core.BuilderConfig):
  category: str = ''
  image_size: int = 256  # stored side
  seed: int = 0
  counts: tuple[tuple[str, int], ...] = ()  # overrides of synthetic_render.DEFAULT_COUNTS


def config_for(category: str, image_size: int | None = None, seed: int = 0,
               counts: dict[str, int] | None = None) -> SyntheticDefectsConfig:
  """The registered config, or one at another size / seed / counts (its name says which)."""
  config = _make_config(category, image_size, seed, counts)
  return _REGISTERED.get(config.name, config)  # TFDS wants the registered object itself


def _make_config(category: str, image_size: int | None, seed: int,
                 counts: dict[str, int] | None) -> SyntheticDefectsConfig:
  if category not in SYNTHETIC_CATEGORIES:
    raise ValueError(f'Unknown synthetic category {category!r}; valid: {SYNTHETIC_CATEGORIES}.')
  default = 512 if category in SYNTHETIC_TEXTURES else 256
  size = image_size or default
  name = category if size == default else f'{category}_{size}'
  if seed:
    name += f'_seed{seed}'
  if counts:
    name += '_n' + '_'.join(f'{k}{v}' for k, v in sorted(counts.items()))
  return SyntheticDefectsConfig(name=name, category=category, image_size=size, seed=seed,
                                counts=tuple(sorted((counts or {}).items())),
                                description=f'Synthetic {category} at {size}x{size}, seed {seed}.')


_REGISTERED = {c: _make_config(c, None, 0, None) for c in SYNTHETIC_CATEGORIES}


class SyntheticDefects(tfds_common.NoTfBuilder):
  """Textures from scikit-image's photographs and rendered objects, with drawn defects and masks."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = list(_REGISTERED.values())

  def __init__(self, *args, **kwargs):
    self._trees: list[weakref.finalize] = []  # generated trees to delete after preparation
    super().__init__(*args, **kwargs)

  def download_and_prepare(self, **kwargs) -> None:
    """TFDS's, then the generated tree is deleted at once: a process that ends without running its
    exit handlers (os._exit, a killed worker) leaves nothing in the temp dir."""
    try:
      super().download_and_prepare(**kwargs)
    finally:
      for remove in self._trees:
        remove()
      self._trees.clear()

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds_common.LocalDatasetInfo(
        builder=self,
        description='Synthetic defect segmentation set in the MVTec AD layout (semiseg).',
        features=tfds_common.features(self.builder_config.image_size),
        homepage='https://scikit-image.org/docs/stable/api/skimage.data.html',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    cfg = self.builder_config
    tmp = tempfile.mkdtemp(prefix='semiseg_synthetic_')
    # Both split generators read it lazily: it goes when preparation ends (download_and_prepare),
    # or with the builder if that never runs them.
    self._trees.append(weakref.finalize(self, shutil.rmtree, tmp, True))
    # Textures are stored at 2x the object side, so one image_size serves both kinds.
    synthetic_render.generate_tree(tmp, [cfg.category], seed=cfg.seed, counts=dict(cfg.counts),
                            object_size=cfg.image_size, texture_size=cfg.image_size,
                            compress_level=0)
    records = mvtec_tree.read_tree(tmp, cfg.category)
    return {'train': tfds_common.examples(records, 'train', cfg.image_size),
            'test': tfds_common.examples(records, 'test', cfg.image_size)}
