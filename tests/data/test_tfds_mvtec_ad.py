"""The mvtec_ad TFDS builder without TensorFlow: from a tree and from a tar.xz; its 15 configs."""

import tarfile

import numpy as np
import tensorflow_datasets as tfds

from semiseg.data import tfds_common, tfds_mvtec_ad
from tests.data import fake_tree


def _check_mvtec(builder, size):
  rows = fake_tree.read_all(builder)
  assert sorted(rows) == sorted(
      [f'train/good/{i:03d}.png' for i in range(4)] + [f'test/good/{i:03d}.png' for i in range(4)]
      + [f'test/type{j}/{i:03d}.png' for j in range(3) for i in range(2)])
  for name, ex in rows.items():
    assert ex['image'].shape == (size, size, 3) and ex['image'].dtype == np.uint8
    assert ex['mask'].shape == (size, size, 1) and set(np.unique(ex['mask'])) <= {0, 1}
    kind = tfds_common.decode_str(ex['defect_type'])
    assert name.split('/')[1] == kind
    assert ex['label'] == int(kind != 'good') == int(ex['mask'].any())
    assert ex['split'] == name.split('/')[0]


def test_mvtec_from_tree_and_tar_xz(tmp_path):
  tree = fake_tree.write_mvtec(str(tmp_path / 'manual_tree'), per_type=2, categories=['bottle'])
  config = tfds_mvtec_ad.config_for('bottle', 16)
  b = tfds_mvtec_ad.MvtecAd(config=config, data_dir=str(tmp_path / 'tfds'))
  b.download_and_prepare(file_format='array_record',
                         download_config=tfds.download.DownloadConfig(manual_dir=tree))
  _check_mvtec(b, 16)

  manual = tmp_path / 'manual_tar'
  manual.mkdir()
  with tarfile.open(manual / 'mvtec_anomaly_detection.tar.xz', 'w:xz') as tar:
    tar.add(f'{tree}/bottle', arcname='bottle')
  b = tfds_mvtec_ad.MvtecAd(config=config, data_dir=str(tmp_path / 'tfds_tar'))
  b.download_and_prepare(file_format='array_record',
                         download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  _check_mvtec(b, 16)


def test_mvtec_configs():
  names = [c.name for c in tfds_mvtec_ad.MvtecAd.BUILDER_CONFIGS]
  assert len(names) == 15 and 'bottle' in names
  sizes = {c.name: c.image_size for c in tfds_mvtec_ad.MvtecAd.BUILDER_CONFIGS}
  assert sizes['carpet'] == 512 and sizes['bottle'] == 256
  assert 'mvtec_anomaly_detection.tar.xz' in tfds_mvtec_ad.MvtecAd.MANUAL_DOWNLOAD_INSTRUCTIONS
