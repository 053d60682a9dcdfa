"""Every table and figure of the paper from one command: trains and evaluates each (category, method,
variant, seed) cell, skipping finished ones, then writes results.csv, report.md and figures/.

Usage:
  python -m experiments.reproduce --config configs/reproduce.py:synthetic --workdir runs/repro
  python -m experiments.reproduce --config configs/reproduce.py:synthetic --workdir /tmp/repro \\
      --config.categories=washer,brick --config.methods=ae,unet,ae_unet --config.seeds=0
  python -m experiments.reproduce --config configs/reproduce.py:mvtec --config.data.root=~/mvtec \\
      --workdir runs/mvtec_repro
  # 4 local worker processes (one GPU each, or a quarter of the CPU cores each), then the report:
  python -m experiments.reproduce --config configs/reproduce.py:synthetic --config.workers=4 --workdir W
  # shard 3 of 8 (e.g. a SLURM array task); after all 8, a collecting call writes the report:
  python -m experiments.reproduce --config configs/reproduce.py:mvtec --config.shard=3/8 --workdir W
  python -m experiments.reproduce --config configs/reproduce.py:mvtec --config.workers=0 --workdir W
"""

import logging
import sys

from absl import app

from experiments import _main
from semiseg import report, reproduce, workers

_main.define_flags()


def main(argv):
  del argv
  config = _main.FLAGS.config
  if config.workers == 1:
    _main.start()
  else:  # collecting, or starting workers: this process leaves the devices to them
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    logging.getLogger().setLevel(logging.INFO)
  command = [sys.executable, '-m', 'experiments.reproduce'] + workers.strip_layout_flags(sys.argv[1:])
  result = reproduce.reproduce(config, _main.FLAGS.workdir, command=command)
  print(f'{len(result.cells_run)} cell(s) run, {len(result.cells_skipped)} already finished; '
        f'report: {result.report_path or "none (a shard of several; --config.workers=0 writes it)"}')
  print('Table 2: defect-class IoU (test split)')
  print(report.metric_table(result.rows, 'defect_iou'))
  if result.cells_missing:
    print(f'{len(result.cells_missing)} cell(s) not finished: {", ".join(result.cells_missing)}')
  for where, why in result.cells_failed:
    print(f'FAILED {where}: {why}')
  for line in result.workers_failed:
    print(f'FAILED {line}')
  if result.cells_failed or result.workers_failed:
    raise SystemExit(1)


if __name__ == '__main__':
  app.run(main)
