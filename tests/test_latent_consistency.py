"""Latent consistency distillation (`cm_jax.methods.latent_consistency`) against the
reference: diffusers' `examples/consistency_distillation/train_lcm_distill_sd_wds.py`.

One LCD loss evaluation is recomputed in PyTorch from that script's formulas: z_{n+k} by
DDPMScheduler.add_noise at t_{n+k} from the 50-point DDIM grid, the student
UNet2DConditionModel (the teacher's config with `time_cond_proj_dim`, the teacher's weights
loaded strict=False, a fresh cond_proj) fed the sin/cos embedding of 1000 w, the
consistency output c_skip z + c_out x0 (LCMScheduler's discrete scalings), the teacher's
conditional and empty-prompt predictions guided as x_c + w (x_c - x_u) for x0 and eps alike,
the DDIM step to t_n = t_{n+k} - 20 (alpha_cumprod of the previous grid point), the target
network (the student at step 0) at t_n, and the pseudo-Huber / l2 loss. cm_jax gets the
same weights (converted with `torch_names.params_from_state_dict`) and the same z, eps,
text states, t and w; the loss agrees within 1e-5 relative and the predictions and targets
within 1e-4, for eps- and v-prediction teachers.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cm_jax.diffusion import lcm
from cm_jax.train import builders
from cm_jax.utils import torch_names
import sd_tiny

PROJ = 8                       # the student's time_cond_proj_dim
GRID_INDEX = np.array([49, 12, 0])  # t_{n+k} = 999, 259, 19 (-> t_n = 979, 239, 0)
W = np.array([3.0, 7.5, 14.0], np.float32)
PROMPTS = ["a red cat", "a blue digit", "seven"]
CASES = [("eps", "huber"), ("eps", "l2"), ("v", "huber")]  # v-l2 adds nothing new


# -- the reference, transcribed into torch ---------------------------------------------------


def _w_features(w, dim):
  """The script's guidance_scale_embedding: sin / cos of 1000 w at geometric frequencies."""
  half = dim // 2
  freqs = torch.exp(torch.arange(half, dtype=torch.float32)
                    * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
  args = (1000.0 * w)[:, None] * freqs[None, :]
  return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def _x0_and_eps(out, t, z, prediction_type, alphas, sigmas):
  a, s = alphas[t].reshape(-1, 1, 1, 1), sigmas[t].reshape(-1, 1, 1, 1)
  if prediction_type == "epsilon":
    return (z - s * out) / a, out
  return a * z - s * out, a * out + s * z  # v_prediction


def _boundary(t, scaling=10.0, sigma_data=0.5):
  u = (scaling * t).to(torch.float32).reshape(-1, 1, 1, 1)
  return sigma_data ** 2 / (u ** 2 + sigma_data ** 2), u / (u ** 2 + sigma_data ** 2) ** 0.5


@torch.no_grad()
def _reference(folder, teacher, student, z, eps, prompt, uncond, prediction, loss_type):
  """(loss, model_pred, x_prev, target) of one step of the reference script (NCHW)."""
  from diffusers import DDPMScheduler  # pylint: disable=g-import-not-at-top
  ptype = {"eps": "epsilon", "v": "v_prediction"}[prediction]
  sched = DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler",
                                        prediction_type=ptype)
  ac = sched.alphas_cumprod
  alphas, sigmas = torch.sqrt(ac), torch.sqrt(1 - ac)
  grid = torch.from_numpy((np.arange(1, 51) * 20).round().astype(np.int64) - 1)
  prev = torch.cat([ac[:1], ac[grid[:-1]]])  # DDIMSolver's alpha_cumprods_prev
  index = torch.from_numpy(GRID_INDEX)
  start = grid[index]
  end = torch.clamp(start - 20, min=0)
  c_skip_start, c_out_start = _boundary(start)
  c_skip, c_out = _boundary(end)
  noisy = sched.add_noise(z, eps, start)
  w = torch.from_numpy(W)
  w_emb = _w_features(w, PROJ)
  w = w.reshape(-1, 1, 1, 1)
  out = student(noisy, start, timestep_cond=w_emb, encoder_hidden_states=prompt).sample
  model_pred = c_skip_start * noisy + c_out_start * _x0_and_eps(out, start, noisy, ptype,
                                                                alphas, sigmas)[0]
  x0_c, eps_c = _x0_and_eps(teacher(noisy, start, encoder_hidden_states=prompt).sample,
                            start, noisy, ptype, alphas, sigmas)
  x0_u, eps_u = _x0_and_eps(teacher(noisy, start, encoder_hidden_states=uncond).sample,
                            start, noisy, ptype, alphas, sigmas)
  x0 = x0_c + w * (x0_c - x0_u)
  eps_hat = eps_c + w * (eps_c - eps_u)
  p = prev[index].reshape(-1, 1, 1, 1)
  x_prev = p.sqrt() * x0 + (1 - p).sqrt() * eps_hat
  out_t = student(x_prev, end, timestep_cond=w_emb, encoder_hidden_states=prompt).sample
  target = c_skip * x_prev + c_out * _x0_and_eps(out_t, end, x_prev, ptype, alphas,
                                                 sigmas)[0]
  d = model_pred.double() - target.double()
  loss = (torch.mean(torch.sqrt(d ** 2 + 0.001 ** 2) - 0.001) if loss_type == "huber"
          else torch.mean(d ** 2))
  return float(loss), model_pred.numpy(), x_prev.numpy(), target.numpy()


# -- the shared setup ------------------------------------------------------------------------


def _nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def setup(tiny_sd_folder):
  """Methods per (prediction, loss), the frozen parts, torch teacher and student, cm_jax's
  copy of the student, inputs, and every cm_jax output from one jitted call."""
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextModel  # pylint: disable=g-import-not-at-top
  folder = str(tiny_sd_folder)
  parts = {}
  for prediction, loss_type in CASES:
    config = sd_tiny.lcd_config(folder, time_cond_proj_dim=PROJ, prediction=prediction,
                                loss_type=loss_type)
    parts[(prediction, loss_type)] = (config, builders.build_parts(config))
  config, first = parts[CASES[0]]
  method = first.method
  frozen = method.load_teacher()

  teacher = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
  torch.manual_seed(7)
  student = UNet2DConditionModel.from_config(teacher.config, time_cond_proj_dim=PROJ).eval()
  result = student.load_state_dict(teacher.state_dict(), strict=False)
  assert list(result.missing_keys) == ["time_embedding.cond_proj.weight"]
  abstract = jax.eval_shape(lambda: builders.init_params(first, config, jax.random.key(0)))
  params = torch_names.params_from_state_dict(
      {k: v.numpy() for k, v in student.state_dict().items()}, abstract, what="student")

  rng = np.random.default_rng(0)
  z = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
  eps = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
  text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()
  ids = method.parts.tokenize(PROMPTS)
  with torch.no_grad():
    prompt = text(torch.from_numpy(np.asarray(ids, np.int64)))[0]
    uncond = text(torch.from_numpy(np.repeat(np.asarray(method.empty_prompt_ids, np.int64),
                                             3, axis=0)))[0]
  context = method.parts.encode_text(frozen["text_encoder"], ids)
  np.testing.assert_allclose(np.asarray(context), prompt.numpy(), atol=1e-5)

  t_start = jnp.asarray((GRID_INDEX + 1) * 20 - 1, jnp.int32)
  t_end = jnp.maximum(t_start - 20, 0)
  methods = {case: p.method for case, (_, p) in parts.items()}

  # The tensors each loss compares (and the teacher's point) are recorded as it is traced,
  # by wrapping the two `lcm` functions consistency_loss calls: one compiled program (XLA
  # merges the four methods' common work) gives everything the tests compare.
  ddim_step, pseudo_huber = lcm.ddim_teacher_step, lcm.pseudo_huber

  def run(params, frozen, z, context, eps, w):
    out, seen = {}, {}

    def ddim(*args):
      seen["z_end"] = ddim_step(*args)
      return seen["z_end"]

    def huber(a, b, c):
      seen["pred"], seen["target"] = a, b
      return pseudo_huber(a, b, c)

    for (prediction, loss_type), m in methods.items():
      with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lcm, "ddim_teacher_step", ddim)
        patch.setattr(lcm, "pseudo_huber", huber)
        out[f"{prediction}/{loss_type}"] = m.consistency_loss(
            params, frozen, params, z, context, eps, t_start, t_end, w)
      if loss_type == "huber":
        out.update({f"{prediction}/{k}": v for k, v in seen.items()})
    return out

  ours = jax.device_get(jax.jit(run)(params, frozen, jnp.asarray(_nhwc(z)), context,
                                     jnp.asarray(_nhwc(eps)), jnp.asarray(W)))
  torch_inputs = dict(teacher=teacher, student=student, z=torch.from_numpy(z),
                      eps=torch.from_numpy(eps), prompt=prompt, uncond=uncond)
  return dict(folder=folder, ours=ours, torch=torch_inputs, parts=parts, method=method,
              frozen=frozen, z=z, eps=eps)


@pytest.mark.parametrize("prediction,loss_type", CASES)
def test_lcd_loss_matches_reference_script(setup, prediction, loss_type):
  loss, pred, x_prev, target = _reference(setup["folder"], prediction=prediction,
                                          loss_type=loss_type, **setup["torch"])
  ours = setup["ours"]
  np.testing.assert_allclose(float(ours[f"{prediction}/{loss_type}"]), loss, rtol=1e-5)
  np.testing.assert_allclose(ours[f"{prediction}/pred"], _nhwc(pred), atol=1e-4, rtol=0)
  np.testing.assert_allclose(ours[f"{prediction}/z_end"], _nhwc(x_prev), atol=1e-4, rtol=0)
  np.testing.assert_allclose(ours[f"{prediction}/target"], _nhwc(target), atol=1e-4, rtol=0)
  # At t_n = 0 the target is the teacher's point itself (c_skip(0) = 1, c_out(0) = 0).
  np.testing.assert_array_equal(ours[f"{prediction}/target"][2], ours[f"{prediction}/z_end"][2])


def test_lcf_next_point_is_add_noise_at_t_n(setup):
  from diffusers import DDPMScheduler  # pylint: disable=g-import-not-at-top
  config = sd_tiny.lcd_config(setup["folder"], name="lcf")
  lcf = builders.build_parts(config).method
  assert lcf.name == "lcf"
  t_start = jnp.asarray([999, 259, 19], jnp.int32)
  t_end = jnp.maximum(t_start - 20, 0)
  z, eps = _nhwc(setup["z"]), _nhwc(setup["eps"])
  got = lcf.next_point(None, jnp.asarray(z), jnp.asarray(eps), None, t_start, t_end, None,
                       None)
  sched = DDPMScheduler.from_pretrained(setup["folder"], subfolder="scheduler")
  want = sched.add_noise(torch.from_numpy(setup["z"]), torch.from_numpy(setup["eps"]),
                         torch.from_numpy(np.asarray(t_end, np.int64)))
  np.testing.assert_allclose(np.asarray(got), _nhwc(want.numpy()), atol=1e-6, rtol=0)


# -- errors ----------------------------------------------------------------------------------


def test_lcd_without_w_input_is_refused(setup):
  config = sd_tiny.lcd_config(setup["folder"], time_cond_proj_dim=None)
  with pytest.raises(ValueError, match="time_cond_proj_dim"):
    builders.build_parts(config)


def test_lcd_unknown_loss_type_is_refused(setup):
  config = sd_tiny.lcd_config(setup["folder"], loss_type="foo")
  with pytest.raises(ValueError, match="loss_type 'foo'"):
    builders.build_parts(config)


def test_lcd_without_teacher_is_a_one_line_error(setup):
  config = sd_tiny.lcd_config(setup["folder"], pretrained="")
  method = builders.build_parts(config).method
  # Without a folder the frozen parts are missing first; with them, the teacher.
  with pytest.raises(ValueError) as missing_parts:
    method.load_teacher()
  assert "\n" not in str(missing_parts.value)
  method.__dict__["parts"] = setup["method"].parts  # the folder's autoencoder and text
  with pytest.raises(ValueError, match="needs a teacher") as missing_teacher:
    method.load_teacher()
  assert "\n" not in str(missing_teacher.value)
  assert "teacher_workdir" in str(missing_teacher.value)
