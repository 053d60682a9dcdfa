"""The grid report's notes: a collapsed training and a closed difference gate, named with their numbers."""

from semiseg import grid, grid_report


def test_report_notes_name_a_collapsed_training_and_a_closed_difference_gate():
  cell = grid.Cell('synthetic_defects', 'gravel', 1, 'ae_unet')
  gate = {'rule': 'trivial', 'open': False, 'd_auroc_labeled': 0.5217, 'trivial_auroc_labeled': 0.5559}
  (note,) = grid_report.cell_notes(cell, {'diff_gate': gate})
  assert note.startswith('gravel/seed1/ae_unet: D entered the U-Net as zeros') and '0.522' in note and '0.556' in note
  assert grid_report.cell_notes(cell, {'diff_gate': {**gate, 'open': True}}) == []
  (note,) = grid_report.cell_notes(cell, {'health': {'collapsed': True, 'warnings': ['the loss ended at 0.2']}})
  assert 'training collapsed (the loss ended at 0.2)' in note
