"""The contact sheet renders a PNG for a folder dataset."""

import os

from PIL import Image

from configs.common import get_base_config
from experiments import show_data
from semiseg.data import pipeline
from tests.data import fake_tree


def test_render_sheet(tmp_path):
  root = str(tmp_path / 'r')
  fake_tree.write_category(root, 'c', {'a': 4, 'b': 4}, size=16)
  c = get_base_config()
  c.data.name, c.data.root, c.data.category, c.data.image_size = 'folder', root, 'c', 16
  data = pipeline.load_category(c.data, None)
  out = str(tmp_path / 'sheet.png')
  show_data.render_sheet(data, out, columns=3, title='t')
  assert os.path.getsize(out) > 0 and Image.open(out).size[0] > 100
