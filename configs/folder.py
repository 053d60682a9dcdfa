"""A user's own images in MVTec layout: <root>/<category>/{train/good, test/<type>, ground_truth/<type>}.

Usage:
  python -m experiments.train --config configs/folder.py:texture=false \\
      --config.data.root=/data/parts --config.data.category=bracket --workdir runs/bracket

Arg words: ``smoke``, ``cpu`` (the CPU sizes); ``key=value`` sets any key, e.g. ``texture=true`` for a
texture-like category (kept at 2x, cropped for training, tiled for evaluation).
"""

from configs import common


def get_config(arg: str | None = None):
  words, pairs = common.parse_arg(arg)
  c = common.get_base_config()
  c.data.name = 'folder'
  c.data.category = 'good_and_bad'
  unknown = [w for w in words if w not in ('smoke', 'cpu')]
  if unknown:
    raise ValueError(f'configs/folder.py: unknown arg word(s) {unknown}; use smoke, cpu or key=value.')
  if 'cpu' in words:
    common.cpu(c)
    # Photographs are resized to the input: at 64 px thin scratches and cracks drawn at 256 px keep
    # ~60 % of their contrast and some of their masks vanish; at 128 px ~80 % and none do
    # (python -m experiments.defect_visibility; README "The CPU config"). The embedded data is drawn
    # at its input size, so its CPU config stays at 64.
    c.data.image_size = 128
  if 'smoke' in words:
    common.smoke(c)
  texture = pairs.pop('texture', None)
  if texture is not None:  # the border follows it (semiseg/data/categories.py)
    c.data.texture = texture.lower() in ('1', 'true')
  common.apply_pairs(c, pairs, 'configs/folder.py')
  return c
