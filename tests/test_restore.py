"""A finished run back from its workdir: its checkpoint and prerequisites restored, never trained."""

import json
import os

import jax
import numpy as np
import pytest

from configs import synthetic
from semiseg import restore, train
from semiseg.methods import prerequisites


def test_restore_trained_gives_the_run_with_the_trained_state(tmp_path):
  config = synthetic.get_config('washer,smoke,method=unet,num_train_steps=3')
  trained = train.train(config, str(tmp_path), progress=False)
  restored = restore.restore_trained(config, str(tmp_path))
  assert int(restored.state.step) == 3 and restored.workdir == str(tmp_path)
  assert restored.num_train_steps == trained.run.num_train_steps == 3
  for a, b in zip(jax.tree.leaves(restored.state), jax.tree.leaves(trained.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  other = synthetic.get_config('washer,smoke,method=pca')
  with pytest.raises(ValueError, match=r"made with method='unet' but the config asks for config.method='pca'"):
    restore.restore_trained(other, str(tmp_path))


def test_restoring_never_trains_a_missing_prerequisite(tmp_path):
  config = synthetic.get_config('washer,smoke')  # ae_unet, whose AE was never trained here
  with pytest.raises(FileNotFoundError, match="prerequisite 'ae' trained there first .*--config.method=ae "
                                              f"--workdir {tmp_path / 'run' / 'ae'}"):
    restore.restore_trained(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'ae' / 'ckpt')


def test_a_prerequisite_is_found_by_its_key_then_run_info_then_beside_the_run(tmp_path):
  config = synthetic.get_config('washer,smoke')  # ae_unet: its 'ae'
  req = prerequisites(config)['ae']
  wd = str(tmp_path / 'run')
  assert restore.prerequisite_workdir(config, 'ae', req, wd) == os.path.join(wd, 'ae')
  os.makedirs(wd)
  with open(os.path.join(wd, 'run_info.json'), 'w') as f:
    json.dump({'config': {'ae_workdir': '/recorded/ae'}}, f)
  assert restore.prerequisite_workdir(config, 'ae', req, wd) == '/recorded/ae'
  config.ae_workdir = '/given/ae'
  assert restore.prerequisite_workdir(config, 'ae', req, wd) == '/given/ae'
  config.ae_workdir = ''
  with pytest.raises(ValueError, match='set config.ae_workdir or give a workdir'):
    restore.prerequisite_workdir(config, 'ae', req, None)


def test_training_health_gathers_the_runs_and_its_prerequisites_health_files(tmp_path):
  config = synthetic.get_config('washer,smoke')
  wd = str(tmp_path / 'run')
  os.makedirs(os.path.join(wd, 'ae'))
  assert restore.training_health(config, wd) == {}
  with open(os.path.join(wd, 'ae', 'health.json'), 'w') as f:
    json.dump({'collapsed': True, 'warnings': ['w']}, f)
  assert restore.training_health(config, wd) == {'prerequisite_health': {'ae': {'collapsed': True,
                                                                                 'warnings': ['w']}}}
  with open(os.path.join(wd, 'health.json'), 'w') as f:
    json.dump({'collapsed': False, 'warnings': []}, f)
  assert restore.training_health(config, wd)['health'] == {'collapsed': False, 'warnings': []}
