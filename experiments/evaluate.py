"""Evaluate a trained workdir on its test split; writes <workdir>/eval.json and prints a table.

Usage:
  python -m experiments.evaluate --config configs/synthetic.py:brick --workdir runs/brick
"""

from absl import app

from experiments import _main
from semiseg import evaluate, restore

_main.define_flags()


def main(argv):
  del argv
  _main.start()
  config = _main.FLAGS.config
  method, state, data, ctx, mesh = restore.restore_trained(config, _main.FLAGS.workdir)
  out = evaluate.evaluate(method, state, data, ctx, mesh, config, _main.FLAGS.workdir,
                          extra=restore.training_health(config, _main.FLAGS.workdir))
  print(evaluate.format_table([out]))


if __name__ == '__main__':
  app.run(main)
