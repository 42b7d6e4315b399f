"""EMA decays against EDM's half-life formula worked out by hand."""
import jax.numpy as jnp
import ml_collections
import numpy as np

from cm_jax.train import ema


def _cfg(rates=(), halflife_kimg=0.0, rampup_ratio=0.0):
  return ml_collections.ConfigDict(dict(rates=rates, halflife_kimg=halflife_kimg,
                                        rampup_ratio=rampup_ratio))


def test_names_in_config_order():
  assert ema.ema_names(_cfg((0.9999, 0.999943), 500.0)) == ("ema_0.9999", "ema_0.999943", "halflife")
  assert ema.ema_names(_cfg()) == ()


def test_fixed_rates_do_not_depend_on_step():
  d = ema.ema_decays(_cfg((0.999,)), jnp.asarray(12345), 512)
  np.testing.assert_allclose(float(d["ema_0.999"]), 0.999, rtol=0, atol=1e-7)


def test_halflife_without_rampup():
  # EDM: beta = 0.5 ** (batch / (halflife_kimg * 1000)); 512 / 500000 images.
  d = ema.ema_decays(_cfg(halflife_kimg=500.0), jnp.asarray(10), 512)
  np.testing.assert_allclose(float(d["halflife"]), 0.5 ** (512 / 500_000), rtol=1e-6)


def test_halflife_rampup():
  cfg = _cfg(halflife_kimg=500.0, rampup_ratio=0.05)
  # Step 0: no images seen -> half-life 0 -> beta = 0: the average is the params.
  assert float(ema.ema_decays(cfg, jnp.asarray(0), 512)["halflife"]) == 0.0
  # Step 100: 51,200 images * 0.05 = 2,560 images of half-life (< 500k).
  np.testing.assert_allclose(float(ema.ema_decays(cfg, jnp.asarray(100), 512)["halflife"]),
                             0.5 ** (512 / 2560.0), rtol=1e-6)
  # Late in training the ramp no longer binds: 10^6 steps * 512 * 0.05 >> 500k.
  np.testing.assert_allclose(float(ema.ema_decays(cfg, jnp.asarray(10**6), 512)["halflife"]),
                             0.5 ** (512 / 500_000), rtol=1e-6)


def test_update_rule():
  avg = {"w": jnp.asarray([1.0, 2.0])}
  new = ema.ema_update(avg, {"w": jnp.asarray([3.0, 6.0])}, 0.75)
  np.testing.assert_allclose(np.asarray(new["w"]), [1.5, 3.0])
