"""One reader for MVTec-layout trees: ``<root>/<category>/{train/good, test/<type>, ground_truth/<type>}``.

Everything that reads images from disk (the TFDS builders, the ``folder`` dataset, the synthetic
generator's tests) goes through this file, so that a malformed tree fails the same way everywhere,
with a message that names the path and the fix.

Colour: every image comes back as uint8 HxWx3. Grayscale images (MVTec's ``grid``, ``screw`` and
``zipper`` are grayscale) are repeated over three channels so every category has the same input
shape; an alpha channel is dropped; 16-bit grayscale is scaled to 8 bits.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')
GOOD = 'good'


class LayoutError(ValueError):
  """A tree, image or mask that does not follow the MVTec layout."""


@dataclasses.dataclass(frozen=True)
class Record:
  """One image of a category; ``filename`` = ``'<split>/<defect_type>/<name>'``, unique in a category."""
  path: str
  split: str  # 'train' | 'test'
  defect_type: str  # 'good' or the defect folder's name
  mask_path: str | None  # None for good images
  filename: str


def _is_image(name: str) -> bool:
  return not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS)


def _subdirs(path: str) -> list[str]:
  return sorted(d for d in os.listdir(path)
                if not d.startswith('.') and os.path.isdir(os.path.join(path, d)))


def list_categories(root: str) -> list[str]:
  """Folders under ``root`` that look like categories (hold ``train/`` or ``test/``), sorted."""
  if not os.path.isdir(root):
    raise LayoutError(f'Dataset root {root!r} does not exist or is not a folder; '
                      'set data.root to the folder that holds one folder per category.')
  return [d for d in _subdirs(root)
          if os.path.isdir(os.path.join(root, d, 'train'))
          or os.path.isdir(os.path.join(root, d, 'test'))]


def _images_in(folder: str, what: str) -> list[str]:
  names = sorted(n for n in os.listdir(folder) if _is_image(n))
  if not names:
    raise LayoutError(f'{what} folder {folder!r} holds no images ({", ".join(IMAGE_EXTENSIONS)}); '
                      'add images or remove the folder.')
  return names


def read_tree(root: str, category: str) -> list[Record]:
  """Lists every image of ``category`` (train first, then test by defect type, by name)."""
  categories = list_categories(root)
  if category not in categories:
    raise LayoutError(f'Unknown category {category!r} under {root!r}; categories found there: '
                      f'{categories or "none"}. Set data.category to one of them, or data.root to '
                      'the folder that holds <category>/train/good.')
  base = os.path.join(root, category)
  train_good = os.path.join(base, 'train', GOOD)
  if not os.path.isdir(train_good):
    raise LayoutError(f'Missing folder {train_good!r}: the MVTec layout keeps the defect-free '
                      'training images in <category>/train/good/; create it and put them there.')
  records = [Record(os.path.join(train_good, n), 'train', GOOD, None, f'train/{GOOD}/{n}')
             for n in _images_in(train_good, 'Training')]
  test = os.path.join(base, 'test')
  if not os.path.isdir(test):
    raise LayoutError(f'Missing folder {test!r}: put test images in <category>/test/<defect_type>/ '
                      '(good ones in test/good/).')
  types = _subdirs(test)
  if not types:
    raise LayoutError(f'Test folder {test!r} has no <defect_type> subfolders; '
                      'put the test images in test/good/ and test/<defect_type>/.')
  for defect_type in types:
    folder = os.path.join(test, defect_type)
    for n in _images_in(folder, 'Test'):
      mask_path = None
      if defect_type != GOOD:
        stem = os.path.splitext(n)[0]
        gt = os.path.join(base, 'ground_truth', defect_type)
        candidates = [os.path.join(gt, stem + '_mask' + ext) for ext in IMAGE_EXTENSIONS]
        mask_path = next((c for c in candidates if os.path.isfile(c)), None)
        if mask_path is None:
          raise LayoutError(f'Defect image {os.path.join(folder, n)!r} has no mask: expected '
                            f'{candidates[0]!r}. Add the mask (white = defect) or move the image.')
      records.append(Record(os.path.join(folder, n), 'test', defect_type, mask_path,
                            f'test/{defect_type}/{n}'))
  return records


def _open(path: str) -> Image.Image:
  """Opens and fully decodes an image, so that a truncated file fails here and names itself."""
  try:
    img = Image.open(path)
    img.load()
  except (OSError, SyntaxError, ValueError) as e:  # PIL reports truncation as OSError
    raise LayoutError(f'Cannot read image {path!r} ({e}); the file is unreadable or truncated: '
                      're-copy or re-extract it, or delete it.') from e
  return img


def _to_rgb(img: Image.Image) -> np.ndarray:
  if img.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
    a = np.asarray(img).astype(np.int64)
    a = (a >> 8) if a.max() > 255 else a  # 16-bit grayscale to 8 bits
    img = Image.fromarray(a.astype(np.uint8), mode='L')
  return np.asarray(img.convert('RGB'), dtype=np.uint8)  # L/P repeat; RGBA/LA drop alpha


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
  """HxWx3 uint8 -> size x size x 3 with antialiasing (PIL Lanczos)."""
  if image.shape[:2] == (size, size):
    return image
  return np.asarray(Image.fromarray(image).resize((size, size), Image.LANCZOS), dtype=np.uint8)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
  """HxWx1 0/1 uint8 -> size x size x 1 by nearest neighbour (stays binary)."""
  if mask.shape[:2] == (size, size):
    return mask
  m = Image.fromarray(mask[..., 0]).resize((size, size), Image.NEAREST)
  return np.asarray(m, dtype=np.uint8)[..., None]


def load_image(path: str, size: int | None = None) -> np.ndarray:
  """uint8 HxWx3 (grayscale repeated to 3 channels), resized with antialiasing when ``size``."""
  image = _to_rgb(_open(path))
  return image if size is None else resize_image(image, size)


def load_mask(path: str, size: int | None = None) -> np.ndarray:
  """uint8 HxWx1 of 0/1 (pixel >= 128 is defect), resized by nearest neighbour when ``size``."""
  gray = np.asarray(_to_rgb(_open(path)).max(axis=-1))
  mask = (gray >= 128).astype(np.uint8)[..., None]
  return mask if size is None else resize_mask(mask, size)


def load_record(record: Record, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(image HxWx3, mask HxWx1 0/1) of a record; good images get an all-zero mask."""
  image = load_image(record.path)
  if record.mask_path is None:
    mask = np.zeros(image.shape[:2] + (1,), np.uint8)
  else:
    mask = load_mask(record.mask_path)
    if mask.shape[:2] != image.shape[:2]:
      raise LayoutError(f'Mask {record.mask_path!r} is {mask.shape[1]}x{mask.shape[0]} but its image '
                        f'{record.path!r} is {image.shape[1]}x{image.shape[0]}; '
                        'masks must match their image size: re-export the mask.')
  if size is not None:
    image, mask = resize_image(image, size), resize_mask(mask, size)
  return image, mask
