"""Benchmark semiseg against a PyTorch reference of the same networks, scipy warps and its own consumers.

Usage:
  pip install -e .[bench]   # PyTorch for the reference networks (optional: without it, n/a)
  python -m experiments.benchmark --out /tmp/bench.json
  python -m experiments.benchmark --what=train,infer --shapes=cpu --repeats=7

``--what``: train, infer, layers, augment, input or all. Inference runs at the last of ``--shapes``;
layers times the forward, input gradient and weight gradient of each distinct 3x3 convolution of the
U-Net on its own, side by side with PyTorch's kernels, to attribute a step's time to layers.
``--shapes``: cpu (configs/synthetic.py's default: 64 px, U-Net 16 features depth 3, AE (16, 32, 64,
64) latent 100, batch 8) and/or paper (256 px, 64 features depth 4, AE (32, 64, 128, 256, 256) latent
500; batch 2 on a CPU, 16 on an accelerator).
Prints a Markdown table; ``--out`` writes the records as JSON; ``--trace DIR`` also records one step
of each train workload with jax.profiler. Ratios are semiseg / reference
throughput, timed side by side in this process (alternating, after warm-up, median of repeats;
each sample runs a workload back to back for at least ``--min_sample_s``).
"""

from __future__ import annotations

import json
import logging
import os
import time

import semiseg  # noqa: F401  (sets the project's XLA flags before jax starts)
from absl import app, flags

FLAGS = flags.FLAGS
WHAT = ('train', 'infer', 'layers', 'augment', 'input')
flags.DEFINE_list('what', ['all'], f'Workloads: any of {WHAT} or all.')
flags.DEFINE_list('shapes', ['cpu', 'paper'], 'Shape settings: cpu and/or paper.')
flags.DEFINE_string('out', None, 'Write the records here as a JSON list.')
flags.DEFINE_string('trace', None, 'Also write a jax.profiler trace of one step of each train workload '
                    'under this folder (Perfetto / TensorBoard); per-op names need '
                    'XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true on a CPU.')
flags.DEFINE_float('min_sample_s', 0.2, 'Each timed sample calls a workload back to back for at least '
                   'this long (steady state, as in a training loop); 0 times single calls.')
flags.DEFINE_integer('repeats', 5, 'Timed repeats at the cpu shapes (median reported).')
flags.DEFINE_integer('paper_repeats', 3, 'Timed repeats at the paper shapes on a CPU (a step takes seconds).')


def settings(names: list[str], platform: str):
  from configs import synthetic
  from semiseg.bench import suite
  out = []
  for name in names:
    if name not in ('cpu', 'paper'):
      raise app.UsageError(f'--shapes: unknown setting {name!r}; use cpu and/or paper.')
    config = synthetic.get_config('washer' if name == 'cpu' else 'washer,paper')
    repeats = FLAGS.repeats
    if name == 'paper':
      config.batch_size = 2 if platform == 'cpu' else 16
      repeats = FLAGS.paper_repeats if platform == 'cpu' else FLAGS.repeats
    out.append(suite.Setting(name, config, repeats))
  return out


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
  import jax
  from semiseg.bench import suite, timing
  what = set(WHAT) if 'all' in FLAGS.what else set(FLAGS.what)
  if what - set(WHAT):
    raise app.UsageError(f'--what: unknown {sorted(what - set(WHAT))}; use {WHAT} or all.')
  platform = jax.devices()[0].platform
  if FLAGS.min_sample_s < 0:
    raise app.UsageError(f'--min_sample_s must be >= 0 seconds, got {FLAGS.min_sample_s}.')
  timing.MIN_SAMPLE_S = FLAGS.min_sample_s
  start, load = time.time(), os.getloadavg()
  logging.info('device %s, XLA_FLAGS=%r, load average %.1f', suite.device_name(),
               os.environ.get('XLA_FLAGS', ''), load[0])
  torch = suite.Torch()
  if torch.why:
    logging.info('reference networks: %s', torch.why)
  peak = timing.gemm_peak_gflops(torch_module=torch.module, torch_device=torch.device)
  logging.info('fp32 GEMM peak %.0f GFLOP/s', peak)
  records = []
  all_settings = settings(FLAGS.shapes, platform)
  for setting in all_settings:
    unet_steps_per_s = None
    if 'train' in what or 'input' in what:
      methods = suite.TRAIN_METHODS if 'train' in what else ('unet',)
      logging.info('train steps at %s: %s', setting.name, setting.shapes)
      train = suite.bench_train(setting, torch, peak, methods, trace_dir=FLAGS.trace)
      unet_steps_per_s = next(r.semiseg_per_s for r in train if r.workload == 'train unet')
      if 'train' in what:
        records += train
    if 'infer' in what and setting is all_settings[-1]:  # the largest shapes asked for
      logging.info('inference at %s', setting.name)
      records += suite.bench_infer(setting, torch, peak)
    if 'layers' in what:
      logging.info('3x3 convolutions of the U-Net at %s', setting.name)
      records += suite.bench_layers(setting, torch, peak)
    if 'input' in what:
      records += suite.bench_input(setting, unet_steps_per_s)
  if 'augment' in what:
    records += suite.bench_augment(16, 256, FLAGS.repeats)
  table = suite.markdown(records)
  print(table)
  print(f'\n{suite.device_name()}; XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; load average '
        f'{load[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end; {time.time() - start:.0f} s in all.')
  if FLAGS.out:
    with open(FLAGS.out, 'w') as f:
      json.dump([r.to_dict() for r in records], f, indent=1)


if __name__ == '__main__':
  app.run(main)
