"""What the two TFDS builders share: the feature spec and turning layout records into examples.

No TensorFlow: images and masks are ``tfds.features.Tensor(..., encoding='zlib')`` (image features
need TensorFlow to encode PNGs), strings are ``tfds.features.Text`` (they come back from
``as_data_source()`` as ``bytes``; decode with ``.decode()``), files are array_record.
"""

from __future__ import annotations

import collections
import concurrent.futures
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from semiseg.data import mvtec_tree

LABELS = ('good', 'defect')


def features(size: int) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      'image': tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8, encoding='zlib'),
      'mask': tfds.features.Tensor(shape=(size, size, 1), dtype=np.uint8, encoding='zlib'),  # 0/1
      'label': tfds.features.ClassLabel(names=LABELS),
      'defect_type': tfds.features.Text(),  # 'good' or the defect folder's name
      'filename': tfds.features.Text(),  # '<split>/<defect_type>/<name>', unique in a category
  })


def examples(records: list[mvtec_tree.Record], split: str, size: int) -> Iterator[tuple[str, dict]]:
  """(key, example) for the records of ``split``, resized to ``size`` (antialias / nearest)."""
  chosen = [r for r in records if r.split == split]
  # Decode ahead in threads (PIL releases the GIL); TFDS encodes in this thread meanwhile.
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    ahead = collections.deque()
    for i, r in enumerate(chosen):
      while len(ahead) < 8 and i + len(ahead) < len(chosen):  # bounded: a few images in memory
        ahead.append(pool.submit(mvtec_tree.load_record, chosen[i + len(ahead)], size))
      image, mask = ahead.popleft().result()
      yield r.filename, {'image': image, 'mask': mask, 'label': int(r.defect_type != mvtec_tree.GOOD),
                       'defect_type': r.defect_type, 'filename': r.filename}


def decode_str(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


class LocalDatasetInfo(tfds.core.DatasetInfo):
  """TFDS's DatasetInfo without the look-up of published metadata for a dataset not prepared yet.

  Our datasets have none, and TFDS 4.9.10 makes an empty temporary folder for that look-up and never
  deletes it: one left in the system temp dir for every builder made before its data exists.
  """

  def initialize_from_bucket(self) -> None:
    pass


class NoTfBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A GeneratorBasedBuilder whose ``code_path`` is the defining file.

  TFDS 4.9.10 finds it through ``importlib_resources``, a package its install does not pull in;
  without it every builder defined inside a package fails in ``download_and_prepare``.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    import inspect  # pylint: disable=g-import-not-at-top
    return epath.Path(inspect.getfile(cls))

  def _generate_examples(self, *args):  # examples come from _split_generators' generators
    raise NotImplementedError
