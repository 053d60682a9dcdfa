"""Mean Teacher's EMA warm-up and teacher, against the reference code's rule computed by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import synthetic
from semiseg.methods import base, mean_teacher, testing
from tests.methods.tiny import fixed_batch, make, tiny_config


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


def test_mean_teacher_is_the_ema_of_the_student():
  m, state, step = make('mean_teacher')
  ema_decay = tiny_config('mean_teacher').consistency.ema_decay
  expected = jax.tree.map(np.asarray, state.params)  # the teacher starts as a copy of the student
  np.testing.assert_array_equal(jax.tree.leaves(state.extras['teacher'])[0], jax.tree.leaves(expected)[0])
  # The reference code's warm-up, by hand: after the k-th update (k = 1, 2, ...) the decay is
  # min(1 - 1/(k + 1), ema_decay): 0.5, 0.667, 0.75, ... until it reaches ema_decay.
  for k, seed in enumerate(range(3), start=1):
    state, metrics = step(state, fixed_batch(seed))
    d = min(1.0 - 1.0 / (k + 1), ema_decay)
    np.testing.assert_allclose(float(metrics['ema_decay']), d, rtol=1e-6)
    expected = jax.tree.map(lambda t, s: d * t + (1 - d) * np.asarray(s), expected, state.params)
  for got, want in zip(jax.tree.leaves(state.extras['teacher']), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  # the score map is the teacher's, not the student's.
  x = base.to_float(fixed_batch()['labeled']['image'])
  teacher_only = state.replace(params=jax.tree.map(jnp.zeros_like, state.params))
  np.testing.assert_allclose(m.score_map(teacher_only, x), m.score_map(state, x), atol=1e-6)
