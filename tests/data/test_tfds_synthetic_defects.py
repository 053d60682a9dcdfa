"""The synthetic_defects TFDS builder without TensorFlow: every defect kind, the five configs."""

from semiseg.data import tfds_common, tfds_synthetic_defects
from tests.data import fake_tree


def test_synthetic_builder(tmp_path):
  config = tfds_synthetic_defects.config_for('pcb', 24, counts={'train': 3, 'test_good': 1, 'defect': 2})
  b = tfds_synthetic_defects.SyntheticDefects(config=config, data_dir=str(tmp_path))
  b.download_and_prepare(file_format='array_record')
  rows = fake_tree.read_all(b)
  assert len(rows) == 3 + 1 + 2 * 4
  kinds = {tfds_common.decode_str(r['defect_type']) for r in rows.values()}
  assert kinds == {'good', 'scratch', 'hole', 'contamination', 'color'}
  for r in rows.values():
    assert r['image'].shape == (24, 24, 3) and r['mask'].any() == bool(r['label'])
  assert [c.name for c in tfds_synthetic_defects.SyntheticDefects.BUILDER_CONFIGS] == [
      'brick', 'grass', 'gravel', 'washer', 'pcb']
