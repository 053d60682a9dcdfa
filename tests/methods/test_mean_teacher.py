"""Mean Teacher's EMA warm-up, against the reference code's rule computed by hand."""

import jax
import numpy as np
import pytest

from configs import synthetic
from semiseg.methods import mean_teacher, testing


def test_ema_decay_warms_up_as_the_reference_code():
  # update_ema_variables: alpha = min(1 - 1 / (global_step + 1), alpha), global_step = updates made.
  for step, expected in ((1, 0.5), (2, 2 / 3), (9, 0.9), (99, 0.99), (1000, 0.99)):
    assert float(mean_teacher.ema_decay_at(np.asarray(step), 0.99)) == pytest.approx(expected, rel=1e-6)


def test_teacher_is_the_running_average_of_the_students_during_warm_up():
  tiny = testing.create_tiny(synthetic.get_config('washer,smoke,method=mean_teacher'),
                             overrides={'consistency.ema_decay': 0.99})
  step = jax.jit(tiny.method.train_step)
  teacher0 = [np.asarray(x, np.float64) for x in jax.tree.leaves(tiny.state.extras['teacher'])]
  s1, m1 = step(tiny.state, tiny.batch)
  student1 = [np.asarray(x, np.float64) for x in jax.tree.leaves(s1.params)]
  s2, m2 = step(s1, tiny.batch)
  student2 = [np.asarray(x, np.float64) for x in jax.tree.leaves(s2.params)]
  assert float(m1['ema_decay']) == pytest.approx(0.5) and float(m2['ema_decay']) == pytest.approx(2 / 3)
  # By hand: t1 = (t0 + s1) / 2; t2 = 2/3 t1 + 1/3 s2 (the mean of t0, s1, s2 with t0, s1 halved).
  for t0, a, b, t1, t2 in zip(teacher0, student1, student2, jax.tree.leaves(s1.extras['teacher']),
                              jax.tree.leaves(s2.extras['teacher'])):
    np.testing.assert_allclose(np.asarray(t1), (t0 + a) / 2, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(t2), (t0 + a) / 3 + b / 3, rtol=1e-5, atol=1e-7)
