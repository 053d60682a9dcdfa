"""Train one method on one category, resuming from the workdir's latest checkpoint, then evaluate.

Usage:
  python -m experiments.train --config configs/synthetic.py:brick --workdir runs/brick
  python -m experiments.train --config configs/mvtec.py:bottle --config.data.root=~/mvtec \\
      --config.method=unet --workdir runs/bottle_unet
"""

from absl import app

from experiments import _main
from semiseg import evaluate, train

_main.define_flags()


def main(argv):
  del argv
  _main.start()
  config = _main.FLAGS.config
  result = train.train(config, _main.FLAGS.workdir)
  out = evaluate.evaluate(result.method, result.state, result.data, result.ctx, result.mesh, config,
                          _main.FLAGS.workdir)
  print(evaluate.format_table([out]))


if __name__ == '__main__':
  app.run(main)
