"""Train one method on one category, resuming from the workdir's latest checkpoint, then evaluate.

Usage:
  python -m experiments.train --config configs/synthetic.py:brick --workdir runs/brick
  python -m experiments.train --config configs/mvtec.py:bottle --config.data.root=~/mvtec \\
      --config.method=unet --workdir runs/bottle_unet
"""

from absl import app
import jax
from absl import logging

from experiments import _main
from semiseg import evaluate, figures, restore, train

_main.define_flags()


def main(argv):
  del argv
  _main.start()
  config, workdir = _main.FLAGS.config, _main.FLAGS.workdir
  run = train.train(config, workdir).run
  out = evaluate.evaluate_run(run, extra=restore.training_health(config, workdir))
  if jax.process_index() == 0:
    path = figures.write_training_curves(workdir, run.metrics_files,
                                         title=f'{config.data.category}, seed {config.seed}')
    if path:
      logging.info('Training curves: %s', path)
  print(evaluate.format_table([out]))


if __name__ == '__main__':
  app.run(main)
