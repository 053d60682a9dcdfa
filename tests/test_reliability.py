"""Reliability: bad input fails early and names the key and the fix; a killed, raced or damaged run
loses nothing; the same config and seed give the same bits; prediction streams in bounded memory.

The reader's own errors (missing folders, masks, truncated images) are tested in tests/data.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import synthetic
from semiseg import fileio, restore, sharding, train
from semiseg.data import categories

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARG = 'washer,smoke,method=unet,num_train_steps=40'  # 32 px, tiny U-Net
CLI = [sys.executable, '-m', 'experiments.train', '--config', f'configs/synthetic.py:{ARG}',
       '--config.ckpt.every_steps=4']


def config_40():
  c = synthetic.get_config(ARG)
  c.ckpt.every_steps = 4
  return c


def leaves(state) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(state)]


def assert_same_bits(a, b) -> None:
  la, lb = leaves(a), leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)


def child_env() -> dict[str, str]:
  """Subprocesses share the session's TFDS data and the tests' compilation cache, and import the
  installed package as the tests do (conftest.py's PYTHONSAFEPATH)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', TQDM_DISABLE='1')
  env['SEMISEG_JAX_CACHE'] = env['JAX_COMPILATION_CACHE_DIR'] = os.environ['SEMISEG_TEST_JAX_CACHE']
  return env


def run_cli(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
  return subprocess.run(args, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=timeout)


def step_dirs(workdir: str) -> list[int]:
  folder = os.path.join(workdir, 'ckpt')
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """An uninterrupted 40-step run: the reference for kills, corruption and reproducibility."""
  wd = str(tmp_path_factory.mktemp('straight'))
  result = train.train(config_40(), wd, progress=False)
  assert step_dirs(wd) == [36, 40]
  return wd, result.state


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize('override,expected', [
    ('--config.nope=1', "flag --config.nope: config has no key 'nope'"),
    ('--config.data.imagesize=64', 'Did you mean --config.data.image_size?'),
    ('--config.batch_size=many', "flag --config.batch_size=many: invalid literal for int()"),
])
def test_unknown_or_mistyped_override_is_one_line_naming_the_key(tmp_path, override, expected):
  r = run_cli(CLI + [override, '--workdir', str(tmp_path)])
  assert r.returncode != 0
  assert 'Traceback' not in r.stderr, r.stderr[-2000:]
  assert 'FATAL Flags parsing error' in r.stderr and expected in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize('arg,match', [
    ('method=ae,data.image_size=34', r'image_size=34 is not divisible by 2\*\*len\(config.model.ae_features\)'),
    ('method=unet,data.k_labeled=50', r"test folder '.*' has \d+ image\(s\); k_labeled=50 "
                                      r".*Lower config.data.k_labeled"),
    ('method=unet,optim.decay_rate=0', r'config.optim.decay_rate must be in \(0, 1\]'),
    ('method=unet,ckpt.every_steps=0', 'config.ckpt.every_steps must be positive'),
    ('method=unet,num_train_steps=-1', 'config.num_train_steps must be >= 0'),
])
def test_values_that_cannot_work_fail_before_training(tmp_path, arg, match):
  config = synthetic.get_config(f'washer,smoke,{arg}')
  with pytest.raises(ValueError, match=match):
    train.train(config, str(tmp_path), progress=False)
  assert not step_dirs(str(tmp_path))


@pytest.mark.parametrize('batch,devices,match', [
    (2, 4, 'config.batch_size=2 does not divide by the 4 devices of the mesh: use a multiple of 4, '
           'e.g. config.batch_size=4.'),
    (6, 4, 'e.g. config.batch_size=8 or 4.'),
])
def test_batch_not_divisible_by_devices(batch, devices, match):
  mesh = types.SimpleNamespace(devices=np.empty(devices, object))  # the check reads only the size
  with pytest.raises(ValueError, match=match.replace('.', r'\.').replace('(', r'\(')):
    sharding.check_batch_size(batch, mesh)
  sharding.check_batch_size(devices * 2, mesh)


def test_ae_trained_at_another_size_names_both_sizes(tmp_path):
  ae_wd = str(tmp_path / 'ae')
  train.train(synthetic.get_config('washer,smoke,method=ae'), ae_wd, progress=False)
  config = synthetic.get_config(f'washer,smoke,method=ae_unet,data.image_size=64,ae_workdir={ae_wd}')
  with pytest.raises(ValueError, match=r'made with image_size=32 but the config asks for '
                                       r'config.data.image_size=64') as e:
    train.train(config, str(tmp_path / 'run'), progress=False)
  assert ae_wd in str(e.value)


def test_checkpoint_of_another_model_is_not_mistaken_for_damage(straight, tmp_path):
  wd = str(tmp_path / 'w')
  shutil.copytree(straight[0], wd)
  config = config_40()
  config.model.unet_features = 8
  with pytest.raises(ValueError, match='other shapes than this config builds'):
    train.train(config, wd, progress=False)
  assert step_dirs(wd) == [36, 40] and not os.path.exists(os.path.join(wd, 'ckpt.corrupt'))


# ---------------------------------------------------------------- faults


def test_kill_and_rerun_ends_with_the_straight_runs_parameters_and_a_second_run_is_refused(
    straight, tmp_path):
  wd = str(tmp_path / 'killed')
  cmd = CLI + ['--workdir', wd]
  first = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 180
    while not step_dirs(wd) and first.poll() is None and time.time() < deadline:
      time.sleep(0.005)
    os.kill(first.pid, signal.SIGSTOP)  # frozen mid-run, still holding the workdir lock
    assert first.poll() is None, first.stderr.read()[-2000:]
    assert step_dirs(wd) and max(step_dirs(wd)) < 40

    second = run_cli(cmd)  # a second run on the same workdir
    assert second.returncode != 0
    assert f'Another run is using the workdir {wd}' in second.stderr, second.stderr[-2000:]
  finally:
    first.kill()  # SIGKILL: no cleanup, maybe a checkpoint half written
    first.wait()
  assert first.returncode == -signal.SIGKILL

  rerun = run_cli(cmd)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert 'Resumed unet from step' in rerun.stderr
  state = restore.restore_trained(config_40(), wd).state
  assert int(state.step) == 40
  assert_same_bits(state, straight[1])


def _damage(step_dir: str, how: str) -> None:
  biggest = max(glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True),
                key=os.path.getsize)
  data = bytearray(open(biggest, 'rb').read())
  if how == 'truncate':
    data = data[:len(data) // 2]
  elif how == 'flip_byte':  # one flipped byte: Orbax reads some such files without an error
    data[len(data) // 2] ^= 0xFF
  else:  # 'wrong_digest': the arrays read fine but differ from what was saved
    meta_file = os.path.join(step_dir, 'meta', 'metadata')
    meta = json.load(open(meta_file))
    meta['state_sha256'] = '0' * 64
    open(meta_file, 'w').write(json.dumps(meta))
    return
  open(biggest, 'wb').write(bytes(data))


@pytest.mark.parametrize('how', ['truncate', 'flip_byte', 'wrong_digest'])
def test_damaged_latest_checkpoint_falls_back_and_the_run_finishes_the_same(straight, tmp_path, caplog,
                                                                             how):
  wd = str(tmp_path / 'w')
  shutil.copytree(straight[0], wd)
  _damage(os.path.join(wd, 'ckpt', '40'), how)
  config = config_40()
  with caplog.at_level(logging.WARNING, logger='semiseg.checkpoint'):
    state = restore.restore_trained(config, wd).state
  assert int(state.step) == 36
  ckpt = os.path.join(os.path.abspath(wd), 'ckpt')
  assert f'Restored checkpoint {ckpt}/36 instead of the newer {ckpt}/40' in caplog.text
  if how == 'flip_byte':  # caught by the storage layer or, where it reads the bytes, by the digest
    assert 'do not match the SHA-256' in caplog.text or 'could not be restored' in caplog.text
  if how == 'wrong_digest':
    assert 'do not match the SHA-256' in caplog.text

  result = train.train(config, wd, progress=False)  # resumes at 36, sets 40 aside, saves 40 again
  assert result.resumed_from == 36
  assert_same_bits(result.state, straight[1])
  assert os.listdir(os.path.join(wd, 'ckpt.corrupt')) == ['40']
  assert step_dirs(wd) == [36, 40]


def test_every_checkpoint_damaged_is_an_error_naming_the_folder(straight, tmp_path):
  wd = str(tmp_path / 'w')
  shutil.copytree(straight[0], wd)
  for step in (36, 40):
    _damage(os.path.join(wd, 'ckpt', str(step)), 'truncate')
  with pytest.raises(RuntimeError, match=r'No checkpoint in .*ckpt could be restored \(tried steps \[40, 36\]\)'):
    restore.restore_trained(config_40(), wd)


def test_nan_loss_stops_at_that_step_and_keeps_the_last_good_checkpoint(tmp_path, replace_unet_loss):
  # state.step is 2 on the way to step 3
  replace_unet_loss(lambda state, new, loss: jnp.where(state.step == 2, jnp.nan, loss))
  config = synthetic.get_config('washer,smoke,method=unet,num_train_steps=8')
  with pytest.raises(FloatingPointError, match=r'Non-finite loss at step 3 .*last good checkpoint is kept'):
    train.train(config, str(tmp_path), progress=False)
  assert step_dirs(str(tmp_path)) == [2]  # ckpt.every_steps=2: step 2, nothing after the NaN


def test_report_files_survive_a_failed_write(tmp_path, monkeypatch):
  for name in ('eval.json', 'run_info.json', 'split.json'):
    path = str(tmp_path / name)
    fileio.write_json_atomic(path, {'old': True})
    real_replace = os.replace

    def fail(*args, **kwargs):
      raise OSError('disk full')
    monkeypatch.setattr(os, 'replace', fail)
    with pytest.raises(OSError, match='disk full'):
      fileio.write_json_atomic(path, {'new': True})
    monkeypatch.setattr(os, 'replace', real_replace)

    class Half:  # the write itself dies half way
      def __init__(self, f):
        self.f = f

      def __enter__(self):
        return self

      def __exit__(self, *exc):
        self.f.close()

      def write(self, data):
        self.f.write(data[:len(data) // 2])
        raise OSError('killed mid-write')
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, 'fdopen', lambda fd, mode: Half(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match='mid-write'):
      fileio.write_json_atomic(path, {'new': True})
    monkeypatch.setattr(os, 'fdopen', real_fdopen)
    assert fileio.read_json(path) == {'old': True}
  assert sorted(os.listdir(tmp_path)) == ['eval.json', 'run_info.json', 'split.json']  # no temp files


def test_train_writes_run_info_atomically(straight, tmp_path, monkeypatch):
  wd = str(tmp_path / 'w')
  shutil.copytree(straight[0], wd)
  before = open(os.path.join(wd, 'run_info.json')).read()

  def fail(*args, **kwargs):
    raise OSError('disk full')
  monkeypatch.setattr(os, 'replace', fail)
  with pytest.raises(OSError, match='disk full'):
    train.train(config_40(), wd, progress=False)
  assert open(os.path.join(wd, 'run_info.json')).read() == before


def test_failed_split_write_leaves_no_split_and_no_temp_file(tmp_path, monkeypatch):
  from semiseg.data import split

  def fail(*args, **kwargs):
    raise OSError('disk full')
  monkeypatch.setattr(os, 'replace', fail)
  with pytest.raises(OSError):
    split.load_or_create_manifest(str(tmp_path), ['a'] * 4, [f'test/a/{i}.png' for i in range(4)],
                                  ['train/good/0.png'], 1, 0)
  assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- reproducibility


def test_same_config_and_seed_give_the_same_bits_split_and_run_record(straight, tmp_path):
  wd = str(tmp_path / 'again')
  result = train.train(config_40(), wd, progress=False)
  assert_same_bits(result.state, straight[1])
  split_json = lambda folder: fileio.read_json(os.path.join(folder, 'split.json'))
  assert split_json(wd) == split_json(straight[0])
  info = fileio.read_json(os.path.join(wd, 'run_info.json'))
  assert {'config', 'versions', 'git_commit', 'devices', 'python', 'platform', 'process_count'} <= set(info)
  # The resolved config: texture, border and flips as the category decided them.
  assert info['config'] == json.loads(categories.apply_category_rules(config_40()).to_json_best_effort())
  assert info['config']['augment']['border'] == 'constant' and info['config']['data']['texture'] is False
  assert info['versions']['jax'] == jax.__version__ and info['versions']['orbax.checkpoint']
  assert len(info['git_commit'] or '') == 40
  assert info['devices'] == [str(d) for d in jax.devices()]


def test_embedded_dataset_builds_the_same_twice(tmp_path):
  from semiseg.data import tfds_common, tfds_synthetic_defects
  counts = {'train': 4, 'test_good': 2, 'defect': 2}
  built = []
  for name in ('a', 'b'):
    config = tfds_synthetic_defects.config_for('washer', 32, counts=counts)
    b = tfds_synthetic_defects.SyntheticDefects(config=config, data_dir=str(tmp_path / name))
    b.download_and_prepare(file_format='array_record')
    rows = {}
    for split_name, source in sorted(b.as_data_source().items()):
      for i in range(len(source)):
        ex = source[i]
        rows[tfds_common.decode_str(ex['filename'])] = (split_name, ex['image'], ex['mask'],
                                                        tfds_common.decode_str(ex['defect_type']))
    built.append(rows)
  assert sorted(built[0]) == sorted(built[1]) and len(built[0]) > 6
  for f, (s, image, mask, kind) in built[0].items():
    s2, image2, mask2, kind2 = built[1][f]
    assert (s, kind) == (s2, kind2)
    np.testing.assert_array_equal(image, image2)
    np.testing.assert_array_equal(mask, mask2)


# ---------------------------------------------------------------- load


def test_predict_streams_in_bounded_memory(tmp_path):
  """Python-heap peak (numpy arrays included) of predict over 16 vs 160 images of 64 px: no growth
  with the count. Peak RSS over 100 vs 1,000 images is measured the same way in a subprocess by hand."""
  from semiseg import predict
  config = synthetic.get_config('washer,smoke,method=ae')
  wd = str(tmp_path / 'ae')
  train.train(config, wd, progress=False)
  src = tmp_path / 'in'
  src.mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(src / '000.png')
  for i in range(1, 160):
    os.link(src / '000.png', src / f'{i:03d}.png')
  small = tmp_path / 'small'
  small.mkdir()
  for i in range(16):
    os.link(src / f'{i:03d}.png', small / f'{i:03d}.png')
  predict.predict(config, wd, str(small), str(tmp_path / 'warm'), progress=False)  # compile once

  def peak(folder) -> int:
    tracemalloc.start()
    try:
      result = predict.predict(config, wd, str(folder), str(tmp_path / f'out_{folder.name}'), progress=False)
      return tracemalloc.get_traced_memory()[1], len(result.rows)
    finally:
      tracemalloc.stop()

  peak_small, n_small = peak(small)
  peak_large, n_large = peak(src)
  assert (n_small, n_large) == (16, 160)
  per_image = 64 * 64 * (3 + 4 + 1 + 3)  # image, float score, mask, overlay: if each were kept
  assert peak_large - peak_small < 0.1 * 144 * per_image + 256 * 1024, (peak_small, peak_large)
