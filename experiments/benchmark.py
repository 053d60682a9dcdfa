"""Benchmark semiseg against a PyTorch reference of the same networks, scipy warps and its own consumers.

Usage:
  pip install -e .[bench]   # PyTorch for the reference networks (optional: without it, n/a)
  python -m experiments.benchmark --out /tmp/bench.json
  python -m experiments.benchmark --what=train,infer --shapes=cpu --repeats=7
  python -m experiments.benchmark --what=loop --out loop.json   # the loop against its bare step
  python -m experiments.benchmark --what=gpu --out gpu.json   # on a GPU: everything issue 15 asks
  python -m experiments.benchmark --what=gpu --shapes=smoke --out /tmp/g.json   # the same, tiny, on a CPU

``--what``: train, infer, layers, augment, input, loop, all (the six), or gpu. Every run first measures
GEMM peaks per precision (fp32 and bf16; on a GPU also TF32), and each GFLOP/s (from the analytic
count of ``semiseg.bench.flops``) is set against the peak of the precision its math runs in. train and
infer run each of ``--precisions`` beside each PyTorch variant of ``--torch_variants`` of that
precision. Inference runs at the last of ``--shapes``; layers times the forward, input gradient and
weight gradient of each distinct 3x3 convolution of the U-Net on its own, side by side with PyTorch's
kernels, to attribute a step's time to layers. loop (at the first of ``--shapes``) times
``semiseg.train``'s loop over ``--loop_steps`` steps against the bare jitted step on the same batches
(``ratio`` = loop / step; images/s; median of 5 runs after an untimed one, 1 under gpu: each run compiles).
``gpu`` is train + infer (batch 1 and 16) + loop at ``--shapes=paper`` (batch 16 on an accelerator), both
precisions, all PyTorch variants, with ``--stage_limit_s`` (150) per stage and ``--time_limit_s`` (540)
in all, so that one run fits a 10-minute device call.
``--shapes``: cpu (configs/synthetic.py's default: 64 px, U-Net 16 features depth 3, AE (16, 32, 64,
64) latent 100, batch 8), paper (256 px, 64 features depth 4, AE (32, 64, 128, 256, 256) latent 500;
batch 2 on a CPU, 16 on an accelerator) and/or smoke (32 px, tiny networks: checks the plumbing).
Default: cpu,paper (gpu: paper).
Prints a Markdown table; ``--out`` writes the records as a JSON list after every stage (a killed run
keeps what it measured; a stage that failed or ran out of time leaves a row saying so and the run
exits 1 at the end). ``--trace DIR`` also records one step of each train workload with jax.profiler.
Ratios are semiseg / reference throughput, timed side by side in this process (alternating, after
warm-up, median of repeats; each sample runs a workload back to back for at least ``--min_sample_s``).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from functools import partial

import semiseg  # noqa: F401  (sets the project's XLA flags before jax starts)
from absl import app, flags

# On a GPU, PyTorch shares the device: JAX takes 45 % of its memory, not its default 75 %.
os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.45')
# On a CPU both runtimes share the cores in this one process, in turn. With OpenMP's default wait policy
# PyTorch's idle threads spin while JAX runs, and wait spinning for cores the other job holds: side by
# side on the shared 2-core machine (U-Net train step, 64 px, load ~5), PyTorch 0.40 -> 4.36 steps/s
# and semiseg 2.34 -> 4.11 with PASSIVE. Read when PyTorch loads its OpenMP library, so set here.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

FLAGS = flags.FLAGS
WHAT = ('train', 'infer', 'layers', 'augment', 'input', 'loop')
SHAPES = ('cpu', 'paper', 'smoke')
flags.DEFINE_list('what', ['all'], f'Workloads: any of {WHAT}, all, or gpu (train + infer at the paper shapes, '
                  'with stage limits).')
flags.DEFINE_list('shapes', None, f'Shape settings, any of {SHAPES}; default cpu,paper (gpu: paper).')
flags.DEFINE_list('precisions', ['fp32', 'bf16'], 'semiseg compute precisions of train and infer '
                  "(config.model.dtype 'float32' / 'bfloat16').")
flags.DEFINE_list('torch_variants', None, 'PyTorch reference variants (semiseg.bench.suite.VARIANTS): fp32 '
                  '(plain), fp32_cl, fp32_cl_compile, bf16_cl, bf16_cl_compile; default all.')
flags.DEFINE_string('out', None, 'Write the records here as a JSON list (after every stage).')
flags.DEFINE_string('trace', None, 'Also write a jax.profiler trace of one step of each train workload '
                    'under this folder (Perfetto / TensorBoard); per-op names need '
                    'XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true on a CPU.')
flags.DEFINE_float('min_sample_s', 0.2, 'Each timed sample calls a workload back to back for at least '
                   'this long (steady state, as in a training loop); 0 times single calls.')
flags.DEFINE_integer('repeats', 5, 'Timed repeats at the cpu shapes (median reported).')
flags.DEFINE_integer('loop_steps', None, 'loop: train steps of the loop and of the bare step, the first of '
                     'which compiles and is not timed; default config.ckpt.every_steps of the shapes (200 at '
                     'cpu), so the run saves one checkpoint, at its end, at the config\'s rate.')
flags.DEFINE_string('loop_method', 'unet', 'loop: the method the loop trains.')
flags.DEFINE_integer('paper_repeats', 3, 'Timed repeats at the paper shapes on a CPU (a step takes seconds).')
flags.DEFINE_integer('gemm_n', None, 'GEMM peak size n (n x n x n); default 2048 on a CPU, 8192 elsewhere.')
flags.DEFINE_float('stage_limit_s', None, 'Seconds per stage (peaks, one train method, one inference batch '
                   'size, ...); a contender taking over half of it to compile is dropped. Default: none '
                   '(gpu: 150); 0: none.')
flags.DEFINE_float('time_limit_s', None, 'Seconds for the whole run; stages not started by then are '
                   'skipped. Default: none (gpu: 540); 0: none.')


def settings(names: list[str], platform: str):
  from configs import synthetic
  from semiseg.bench import suite
  out = []
  for name in names:
    if name not in SHAPES:
      raise app.UsageError(f'--shapes: unknown setting {name!r}; use any of {SHAPES}.')
    config = synthetic.get_config({'cpu': 'washer', 'paper': 'washer,paper,recipe=paper', 'smoke': 'washer,smoke'}[name])
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
  from semiseg.bench import layers, loop, networks, suite, timing
  what = set(FLAGS.what)
  gpu = 'gpu' in what
  what = (set(WHAT) if 'all' in what else what - {'gpu'}) | ({'train', 'infer', 'loop'} if gpu else set())
  if what - set(WHAT):
    raise app.UsageError(f'--what: unknown {sorted(what - set(WHAT))}; use {WHAT}, all or gpu.')
  precisions = tuple(FLAGS.precisions)
  if set(precisions) - set(suite.DTYPES):
    raise app.UsageError(f'--precisions: use any of {tuple(suite.DTYPES)}, got {precisions}.')
  variants = tuple(FLAGS.torch_variants or suite.VARIANTS)
  if set(variants) - set(suite.VARIANTS):
    raise app.UsageError(f'--torch_variants: unknown {sorted(set(variants) - set(suite.VARIANTS))}; '
                         f'use any of {tuple(suite.VARIANTS)}.')
  platform = jax.devices()[0].platform
  if FLAGS.min_sample_s < 0:
    raise app.UsageError(f'--min_sample_s must be >= 0 seconds, got {FLAGS.min_sample_s}.')
  timing.MIN_SAMPLE_S = FLAGS.min_sample_s
  # Unset: the gpu defaults (one run fits a 10-minute device call), else none; 0: none.
  stage_limit_s = (FLAGS.stage_limit_s if FLAGS.stage_limit_s is not None else 150 if gpu else 0) or None
  time_limit_s = (FLAGS.time_limit_s if FLAGS.time_limit_s is not None else 540 if gpu else 0) or None
  prepare_limit_s = stage_limit_s / 2 if stage_limit_s else None
  start, load = time.time(), os.getloadavg()
  logging.info('device %s, XLA_FLAGS=%r, load average %.1f', suite.device_name(),
               os.environ.get('XLA_FLAGS', ''), load[0])
  torch = suite.Torch()
  if torch.why:
    logging.info('reference networks: %s', torch.why)
  stages = suite.Stages(FLAGS.out, stage_limit_s, time_limit_s)
  measured = stages.run('peaks', lambda: networks.bench_peaks(torch, FLAGS.gemm_n)) or []
  peaks = {r.precision: r.peak_gflop_per_s for r in measured}
  logging.info('GEMM peaks (GFLOP/s): %s', {k: round(v) if v else v for k, v in peaks.items()})
  all_settings = settings(FLAGS.shapes or (['paper'] if gpu else ['cpu', 'paper']), platform)
  unet_steps_per_s = {}  # fp32 U-Net steps/s per setting: the input path's reference

  def train(setting, name):
    # --what=input alone measures the fp32 U-Net step for its reference but reports only the input rows.
    ours, theirs = (precisions, variants) if 'train' in what else (('fp32',), ())
    rows = networks.bench_train(setting, torch, peaks, (name,), ours, theirs, FLAGS.trace, prepare_limit_s)
    if name == 'unet':
      unet_steps_per_s[setting.name] = next((r.semiseg_per_s for r in rows if r.precision == 'fp32'), None)
    return rows if 'train' in what else []

  def infer(setting, b):
    return networks.bench_infer(setting, torch, peaks, (b,), precisions, variants, prepare_limit_s)
  todo = []  # (stage name, fn) in the order they run
  for setting in all_settings:
    methods = networks.TRAIN_METHODS if 'train' in what else ('unet',) if 'input' in what else ()
    todo += [(f'train {name} {setting.name}', partial(train, setting, name)) for name in methods]
    if 'infer' in what and setting is all_settings[-1]:  # the largest shapes asked for
      todo += [(f'infer b{b} {setting.name}', partial(infer, setting, b)) for b in (1, 16)]
    if 'layers' in what:
      todo.append((f'layers {setting.name}', partial(layers.bench_layers, setting, torch, peaks)))
    if 'loop' in what and setting is all_settings[0]:  # the smallest shapes asked for
      todo.append((f'loop {setting.name}', partial(loop.bench_loop, setting, FLAGS.loop_method, FLAGS.loop_steps,
                                                   1 if gpu else min(5, setting.repeats))))  # each run compiles
    if 'input' in what:
      todo.append((f'input {setting.name}',
                   lambda setting=setting: suite.bench_input(setting, unet_steps_per_s.get(setting.name))))
  if 'augment' in what:
    todo.append(('augment', partial(suite.bench_augment, 16, 256, FLAGS.repeats)))
  if gpu:  # what issue 15's targets are about first, in case the time runs out
    first = ('train unet', 'train ae_unet', 'infer b16', 'infer b1', 'loop')
    todo.sort(key=lambda stage: next((i for i, f in enumerate(first) if stage[0].startswith(f)), len(first)))
  for name, fn in todo:
    stages.run(name, fn)
  records = stages.records
  print(suite.markdown(records))
  print(f'\n{suite.device_name()}; XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; load average '
        f'{load[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end; {time.time() - start:.0f} s in all.')
  if stages.failed:
    logging.error('stages that did not finish: %s', ', '.join(stages.failed))
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
