"""TFDS builder for MVTec AD from a manual download (tar.xz or an extracted tree); no TensorFlow.

    builder = MvtecAd(config='bottle', data_dir=...)
    builder.download_and_prepare(file_format='array_record',
        download_config=tfds.download.DownloadConfig(manual_dir='/path/with/the/tar.xz/or/tree'))
    source = builder.as_data_source()  # {'train': ..., 'test': ...}, random access

One config per category; objects are stored at 256x256, the five textures at 512x512 (paper 3.3:
textures are cropped to 256 in training). Images are resized with antialiasing, masks by nearest.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import shutil
import tarfile
import tempfile

import tensorflow_datasets as tfds

from semiseg.data import mvtec_tree, tfds_common
from semiseg.data.categories import MVTEC_CATEGORIES, MVTEC_TEXTURES

ARCHIVE = 'mvtec_anomaly_detection.tar.xz'


@dataclasses.dataclass(eq=False)
class MvtecAdConfig(tfds.core.BuilderConfig):
  category: str = ''
  image_size: int = 256  # stored side


def config_for(category: str, image_size: int | None = None) -> MvtecAdConfig:
  """The registered config, or (for tests, small runs) one at another stored size."""
  config = _make_config(category, image_size)
  return _REGISTERED.get(config.name, config)  # TFDS wants the registered object itself


def _make_config(category: str, image_size: int | None) -> MvtecAdConfig:
  if category not in MVTEC_CATEGORIES:
    raise ValueError(f'Unknown MVTec AD category {category!r}; valid: {MVTEC_CATEGORIES}.')
  default = 512 if category in MVTEC_TEXTURES else 256
  size = image_size or default
  name = category if size == default else f'{category}_{size}'
  return MvtecAdConfig(name=name, category=category, image_size=size,
                       description=f'MVTec AD {category} at {size}x{size}.')


_REGISTERED = {c: _make_config(c, None) for c in MVTEC_CATEGORIES}


def _extract(archive: str, cache: str) -> str:
  """Extracts ``archive`` once into ``cache`` (atomically: temp folder, then rename) and returns it.

  Python's tarfile, not ``dl_manager.extract``: TFDS's extractor writes through TensorFlow's gfile.
  TFDS would not guess ``.tar.xz`` anyway; tarfile's ``r:*`` reads xz. All 15 categories share one
  extraction, so the 5 GB archive is decompressed once.
  """
  target = os.path.join(cache, os.path.basename(archive).split('.')[0])
  if os.path.isdir(target):
    return target
  os.makedirs(cache, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.extracting.', dir=cache)
  try:
    with tarfile.open(archive, 'r:*') as tar:
      tar.extractall(tmp, filter='data')  # 'data': no absolute paths, links out, or devices
    os.replace(tmp, target)
  except (tarfile.TarError, OSError, EOFError) as e:
    raise mvtec_tree.LayoutError(f'Cannot extract {archive!r} ({e}); the download is incomplete or '
                             f'corrupt: download {ARCHIVE} again.') from e
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return target


class MvtecAd(tfds_common.NoTfBuilder):
  """MVTec AD (Bergmann et al., CVPR 2019), one config per category."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = list(_REGISTERED.values())
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  MVTec AD is licensed CC BY-NC-SA 4.0 and cannot be fetched by code. Download
  `{ARCHIVE}` from https://www.mvtec.com/company/research/datasets/mvtec-ad (a form asks
  you to accept the licence) and put it, or the folder it extracts to (holding bottle/, cable/,
  ...), in the manual dir (`data.root` in semiseg configs).
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds_common.LocalDatasetInfo(
        builder=self,
        description='MVTec AD: 15 categories of industrial images with pixel defect masks.',
        features=tfds_common.features(self.builder_config.image_size),
        homepage='https://www.mvtec.com/company/research/datasets/mvtec-ad',
        citation='@inproceedings{bergmann2019mvtec, title={MVTec AD -- A Comprehensive Real-World '
                 'Dataset for Unsupervised Anomaly Detection}, author={Bergmann, Paul and Fauser, '
                 'Michael and Sattlegger, David and Steger, Carsten}, booktitle={CVPR}, year={2019}}',
        license='CC BY-NC-SA 4.0',
    )

  def _find_root(self, dl_manager) -> str:
    manual = os.fspath(dl_manager.manual_dir)
    category = self.builder_config.category
    for root in (manual, os.path.join(manual, 'mvtec_anomaly_detection')):
      if os.path.isdir(os.path.join(root, category)):
        return root
    archives = sorted(glob.glob(os.path.join(manual, '*.tar.xz')))
    if not archives:
      raise mvtec_tree.LayoutError(
          f'MVTec AD: neither {os.path.join(manual, category)!r} nor a *.tar.xz archive is in the '
          f'manual dir {manual!r}. Put {ARCHIVE} or its extracted tree there.')
    extracted = _extract(archives[0], os.path.join(os.fspath(dl_manager.download_dir), 'extracted'))
    for root in (extracted, os.path.join(extracted, 'mvtec_anomaly_detection')):
      if os.path.isdir(os.path.join(root, category)):
        return root
    raise mvtec_tree.LayoutError(f'MVTec AD: archive {archives[0]!r} holds no {category}/ folder; '
                             f'is it {ARCHIVE}?')

  def _split_generators(self, dl_manager):
    root = self._find_root(dl_manager)
    records = mvtec_tree.read_tree(root, self.builder_config.category)
    size = self.builder_config.image_size
    return {'train': tfds_common.examples(records, 'train', size),
            'test': tfds_common.examples(records, 'test', size)}
