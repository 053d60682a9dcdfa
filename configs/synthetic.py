"""The embedded default dataset (``synthetic_defects``): the paper's method sized for a CPU.

Usage:
  python -m experiments.train --config configs/synthetic.py:brick --workdir runs/brick
  python -m experiments.train --config configs/synthetic.py:washer,method=unet,smoke --workdir /tmp/w
  python -m experiments.evaluate --config configs/synthetic.py:brick --workdir runs/brick

Arg words: a category (brick, grass, gravel, washer, pcb; default brick), ``smoke`` (seconds on a
CPU), ``paper`` (the paper's sizes: 256 px, 64 features, latent 500, 200 epochs); ``key=value`` sets any key.
"""

from configs import common
from semiseg.data.categories import SYNTHETIC_CATEGORIES


def get_config(arg: str | None = None):
  words, pairs = common.parse_arg(arg)
  c = common.get_base_config()
  c.data.name = 'synthetic_defects'
  c.data.category = 'brick'
  common.select_category(c, words, SYNTHETIC_CATEGORIES, ('smoke', 'paper'), 'configs/synthetic.py')
  if 'paper' not in words:
    common.cpu(c)
  if 'smoke' in words:
    common.smoke(c)
  common.apply_pairs(c, pairs, 'configs/synthetic.py')
  return c
