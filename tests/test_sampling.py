"""Per-image seeds: image i is the same whatever the batch it is generated in."""
import numpy as np

from cm_jax import sampling
from cm_jax.train import builders


def _generate(config, state, parts, batch_size, num=6, seed=3, **kw):
  params = builders.params_for_sampling(state, "ema", config.ema)
  return sampling.generate(parts.method, params, num=num, seed=seed, batch_size=batch_size,
                           num_steps=3, image_shape=parts.image_shape,
                           num_classes=config.data.num_classes, **kw)


def test_images_do_not_depend_on_batch_size(tiny_edm_run):
  config, _, state = tiny_edm_run
  parts = builders.build_parts(config)
  a, la = _generate(config, state, parts, batch_size=4)
  b, lb = _generate(config, state, parts, batch_size=6)
  assert a.shape == (6, 8, 8, 1) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(la, lb)
  # A different seed gives different images; labels cover the classes at random.
  c, _ = _generate(config, state, parts, batch_size=6, seed=4)
  assert not np.array_equal(a, c)
  assert la.min() >= 0 and la.max() < config.data.num_classes


def test_class_label_fixes_every_label(tiny_edm_run):
  config, _, state = tiny_edm_run
  parts = builders.build_parts(config)
  _, labels = _generate(config, state, parts, batch_size=6, class_label=7)
  np.testing.assert_array_equal(labels, np.full(6, 7))


def test_params_for_sampling_names(tiny_edm_run):
  config, _, state = tiny_edm_run
  assert builders.params_for_sampling(state, "online", config.ema) is state.params
  assert builders.params_for_sampling(state, "ema", config.ema) is state.ema["halflife"]
  try:
    builders.params_for_sampling(state, "ema_0.5", config.ema)
  except ValueError as e:
    assert "halflife" in str(e)
  else:
    raise AssertionError("an unknown EMA name must be refused")
