"""The embedded default dataset (``synthetic_defects``), at the CPU size with the project's recipe.

Usage:
  python -m experiments.train --config configs/synthetic.py:brick --workdir runs/brick
  python -m experiments.train --config configs/synthetic.py:washer,method=unet,smoke --workdir /tmp/w
  python -m experiments.evaluate --config configs/synthetic.py:brick --workdir runs/brick

Arg words: a category (brick, grass, gravel, washer, pcb; default brick); a size: ``cpu`` (default),
``paper`` (the paper's: 256 px, 64 features, 200 epochs) or ``smoke`` (seconds on a CPU);
``recipe=semiseg`` (default: the recipe the embedded data's results were measured with) or
``recipe=paper``; ``key=value`` sets any key.
"""

from configs import common
from semiseg.data.categories import SYNTHETIC_CATEGORIES


def get_config(arg: str | None = None):
  where = 'configs/synthetic.py'
  c, pairs = common.make_config(arg, where=where, dataset='synthetic_defects', category='brick',
                                categories=SYNTHETIC_CATEGORIES, default_size='cpu',
                                default_recipe='semiseg')
  common.apply_pairs(c, pairs, where)
  return c
