"""A user's own images in MVTec layout: <root>/<category>/{train/good, test/<type>, ground_truth/<type>}.

Usage:
  python -m experiments.train --config configs/folder.py:cpu,texture=false \\
      --config.data.root=/data/parts --config.data.category=bracket --workdir runs/bracket

Arg words: a size: ``paper`` (default: 256 px, 200 epochs, for a GPU), ``cpu`` (128 px, minutes on a
laptop) or ``smoke``; ``recipe=semiseg`` (default: the recipe measured to work on the embedded
photographs) or ``recipe=paper``; ``texture=true`` for a texture-like category (kept at 2x, cropped for
training, tiled for evaluation); ``key=value`` sets any key.
"""

from configs import common


def _cpu_photographs(c):
  # Photographs resized to 64 px lose thin scratches' contrast and some masks; at 128 px none vanish
  # (python -m experiments.defect_visibility; experiments/results/image_size.md).
  c.data.image_size = 128


def get_config(arg: str | None = None):
  where = 'configs/folder.py'
  words, pairs = common.parse_arg(arg)
  texture = pairs.pop('texture', None)
  rest = ','.join(words + [f'{k}={v}' for k, v in pairs.items()])
  c, pairs = common.make_config(rest, where=where, dataset='folder', category='good_and_bad',
                                categories=(), default_size='paper', default_recipe='semiseg',
                                sizes={'cpu': (_cpu_photographs,)})
  if texture is not None:  # the border follows it (semiseg/data/categories.py)
    c.data.texture = texture.lower() in ('1', 'true')
  common.apply_pairs(c, pairs, where)
  return c
