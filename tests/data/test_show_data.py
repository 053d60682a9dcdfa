"""The contact sheet renders a PNG for a folder dataset."""

import numpy as np
from PIL import Image

from configs.common import get_base_config
from experiments import show_data
from semiseg.data import pipeline
from tests.data import fake_tree


def test_render_sheet(tmp_path, monkeypatch):
  """Row 1 the first unlabeled images, row 2 one test image per defect type, row 3 the same image with its
  mask painted red (0.45 image + 0.55 red, by hand), read off the images drawn; a PNG written."""
  import matplotlib.axes
  root = str(tmp_path / 'r')
  fake_tree.write_category(root, 'c', {'a': 4, 'b': 4}, size=16)
  c = get_base_config()
  c.data.name, c.data.root, c.data.category, c.data.image_size = 'folder', root, 'c', 16
  data = pipeline.load_category(c.data, None)
  drawn = {}
  imshow = matplotlib.axes.Axes.imshow

  def recording_imshow(ax, x, *args, **kwargs):
    spec = ax.get_subplotspec()
    drawn[(spec.rowspan.start, spec.colspan.start)] = (np.array(x), ax)
    return imshow(ax, x, *args, **kwargs)
  monkeypatch.setattr(matplotlib.axes.Axes, 'imshow', recording_imshow)
  out = str(tmp_path / 'sheet.png')
  show_data.render_sheet(data, out, columns=3, title='t')
  assert Image.open(out).size[0] > 100
  assert sorted(drawn) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (2, 1)]
  for j in range(3):
    np.testing.assert_array_equal(drawn[(0, j)][0], data.unlabeled.images[j])
  types = list(data.test.defect_types)
  for j, t in enumerate(['a', 'b']):  # the first test image of each defect type, in order
    i = types.index(t)
    image, ax = drawn[(1, j)]
    np.testing.assert_array_equal(image, data.test.images[i])
    assert ax.get_title() == t
    mask = data.test.masks[i, ..., 0].astype(bool)
    assert mask.any()
    want = data.test.images[i].astype(np.float64)
    want[mask] = 0.45 * want[mask] + 0.55 * np.array([255, 0, 0])
    np.testing.assert_allclose(drawn[(2, j)][0], want.astype(np.uint8), atol=1)
