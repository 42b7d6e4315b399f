"""The digits32 LCM configs end to end on the tiny latent runs (tests/conftest.py): LCD from
the latent teacher, LCF from that LCD run, LCM-LoRA on the teacher; each trains, checkpoints
and samples with the LCM sampler."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax import runs, sampling
from cm_jax.train import builders, loop
from configs import digits32_lcd, digits32_lcf, digits32_lcm_lora


def _config(module, tiny_latent_runs, **method):
  vae_dir, _, ldm_dir = tiny_latent_runs
  c = module.get_config("tiny")
  c.method.update(vae_workdir=vae_dir, teacher_workdir=ldm_dir)
  c.method.update(**method)
  return c


def _sample(config, workdir, **options):
  parts = builders.build_parts(config)
  params = runs.load_run(workdir, config.sample.params).params
  return sampling.generate(parts.method, params, num=4, seed=0, batch_size=4, num_steps=2,
                           image_shape=parts.image_shape, num_classes=10, **options)


def _flat(tree):
  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_lcd_starts_from_its_teacher_with_a_fresh_w_layer(tiny_latent_runs):
  config = _config(digits32_lcd, tiny_latent_runs)
  parts = builders.build_parts(config)
  frozen = parts.method.load_teacher()
  fresh = builders.init_params(parts, config, jax.random.key(0))
  start = _flat(parts.method.initial_params(fresh, frozen))
  teacher = _flat(frozen["unet"])
  assert set(start) - set(teacher) == {"['time_embedding']['cond_proj']['kernel']"}
  assert all(np.array_equal(start[k], teacher[k]) for k in teacher)


def test_lcd_then_lcf_train_and_sample_with_w(tiny_latent_runs, tmp_path):
  lcd = _config(digits32_lcd, tiny_latent_runs)
  state = loop.train(lcd, str(tmp_path / "lcd"), progress=False)
  assert int(state.step) == 2 and state.target_params is not None
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state.params))
  lcf = _config(digits32_lcf, tiny_latent_runs, teacher_workdir="",
                init_workdir=str(tmp_path / "lcd"))
  state = loop.train(lcf, str(tmp_path / "lcf"), progress=False)
  assert int(state.step) == 2
  images, labels = _sample(lcf, str(tmp_path / "lcf"), guidance=2.0)
  assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8 and labels.shape == (4,)
  assert images.std() > 0


def test_lcf_refuses_a_start_that_is_not_an_lcm(tiny_latent_runs):
  _, _, ldm_dir = tiny_latent_runs
  config = _config(digits32_lcf, tiny_latent_runs, teacher_workdir="", init_workdir=ldm_dir)
  with pytest.raises(ValueError, match="LCF starts from an LCM"):
    builders.build_parts(config).method.load_teacher()


def test_lcm_lora_trains_and_keeps_only_the_adapters(tiny_latent_runs, tmp_path):
  from cm_jax.train.state import count_params  # pylint: disable=g-import-not-at-top
  config = _config(digits32_lcm_lora, tiny_latent_runs)
  state = loop.train(config, str(tmp_path / "lora"), progress=False)
  leaves = _flat(state.params)
  assert leaves and all(k.endswith(("['lora_A']", "['lora_B']")) for k in leaves)
  assert state.target_params is None  # the target is the online student
  adapters = count_params(state.params)
  teacher = count_params(runs.load_run(tiny_latent_runs[2], "ema").params)
  assert adapters < teacher / 2  # only the adapters train and are saved
  assert count_params(state.opt_state) <= 2 * adapters + 16  # Adam's two moments, counts
  saved = runs.load_run(str(tmp_path / "lora"), config.sample.params).params
  assert _flat(saved).keys() == leaves.keys()
  images, _ = _sample(config, str(tmp_path / "lora"))
  assert images.shape == (4, 16, 16, 3)


def test_lcf_refuses_lora_adapters(tiny_latent_runs):
  # The LCF config as it is plus lora_rank: the LCF error, not LCD's LoRA advice, comes first.
  config = _config(digits32_lcf, tiny_latent_runs, teacher_workdir="", lora_rank=2)
  with pytest.raises(ValueError, match="lora_rank=0"):
    builders.build_parts(config)
