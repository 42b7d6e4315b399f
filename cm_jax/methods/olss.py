"""OLSS, the optimal linear subspace search scheduler (Duan et al. 2023, CIKM): a few-step
sampler for any diffusion teacher, fitted (not trained) from the teacher's own trajectories.

Fit (`fit`, run by train.py through cm_jax.train.fit):
  1. Trajectories: the teacher's full deterministic sampler (method.teacher_sampler, by
     default its own: DDIM for the VP teacher, Heun for EDM) on method.teacher_steps levels
     for method.num_trajectories starting noises, labels cycling over the classes, guided
     with method.guidance when non-zero; the sampler callback records every step's state
     x_i and denoised D_i. They are kept in float64 in two coordinates that make one
     tolerance mean the same at every noise level (the reference works in Stable
     Diffusion's VP latents, where it reads the UNet's eps output):
       state   z_i = x_i / sqrt(1 + sigma_i^2)   (VP scaling: unit variance at every level;
                                                   exactly the VP teacher's z, and z_N = x_N)
       output  e_i = (x_i - D_i) / sigma_i        (the eps prediction, whatever the teacher's
                                                   parameterisation)
  2. Path: searched (method.path = 'search', the paper's OLSS) or uniform ('uniform', OLSS-P),
     then the float64 least squares per step (cm_jax.diffusion.olss_solver), each step from
     the current state (method.basis = 'current') or from z_T ('start', the reference's).
  The run saves the path, its levels, wx, we, the per-step errors and the labels used; the
  config records the teacher's step and a hash of its weights and the guidance w.

Sampling (`sample`), n = method.steps network evaluations (2n with guidance):
  z_0 = z_T;  for j < n:  e_j = (x - D(x; sigma_{i_j})) / sigma_{i_j} at x = z_j sqrt(1 + sigma^2),
              z_{j+1} = wx_j b_j + sum_{m <= j} we_{j,m} e_m;      the image is z_n,
  b_j = z_j (basis 'current') or z_T ('start').
The teacher is read from its run at sampling time (a fitted run holds only the coefficients,
so fitting many step counts does not copy the teacher each time) and must be the one the
coefficients were fitted on.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from cm_jax import conditioning as cond_lib
from cm_jax.diffusion import olss_solver
from cm_jax.methods import teachers

TEACHER_METHODS = ("edm", "vp")
# Deterministic samplers whose callback sees every level of the grid (a stochastic one would
# record a trajectory the linear scheduler cannot follow).
TRAJECTORY_SAMPLERS = ("ddim", "euler", "heun", "dpmpp_2m")
PATHS = ("search", "uniform")


def method_config(**overrides) -> ml_collections.ConfigDict:
  """config.method of an OLSS fit; every field can be set with --config.method.<name>."""
  c = ml_collections.ConfigDict(dict(
      name="olss",
      teacher_workdir="",     # the trained edm or vp run whose sampler is fitted
      teacher_params="ema",   # which copy of its weights
      teacher_step=-1,        # -1: its latest checkpoint (the fit records the step it read)
      steps=5,                # n: network evaluations of the fitted sampler (2n guided)
      path="search",          # search (OLSS) | uniform (OLSS-P)
      basis="current",        # each step from the current state | start: from z_T (EasyNLP)
      teacher_sampler="",     # '' = the teacher's own (ddim | euler | heun | dpmpp_2m)
      teacher_steps=100,      # N: levels of the recorded trajectories (the paper: 100)
      num_trajectories=64,    # B starting noises (labels 0, 1, ..., cycling over classes)
      trajectory_batch=64,    # trajectories recorded per compiled call (memory)
      guidance=0.0,           # classifier-free w of the recorded (and the fitted) sampler
      search_iterations=30,   # bisections of the tolerance (the reference's 30)
      search_tolerance=10.0,  # the tolerance range's upper end (the reference's [0, 10])
  ))
  c.update(overrides)
  return c


def vp_scale(sigma):
  """sqrt(1 + sigma^2): x = z * vp_scale(sigma) between VE and VP-scaled coordinates."""
  return np.sqrt(1.0 + np.square(np.asarray(sigma, np.float64)))


def record_trajectories(teacher_method, teacher_params, noise, labels, *, sampler: str,
                        num_steps: int, guidance: float = 0.0, batch_size: int = 64,
                        progress: bool = False):
  """The teacher's trajectories: (states (N + 1, B, ...), outputs (N, B, ...), grid (N + 1,)),
  float64 numpy, in the coordinates of the module doc; `noise` (B, H, W, C) unit normal."""
  if sampler not in TRAJECTORY_SAMPLERS:
    raise ValueError(f"OLSS records a deterministic sampler's trajectory: method."
                     f"teacher_sampler must be one of {TRAJECTORY_SAMPLERS}, got {sampler!r}")
  from cm_jax.diffusion import samplers  # pylint: disable=g-import-not-at-top
  noise = np.asarray(noise, np.float32)
  seen = {}  # step -> (x, denoised, sigma) of the batch being recorded

  def record(i, x, denoised, sigma):
    seen[int(i)] = (np.asarray(x, np.float64), np.asarray(denoised, np.float64), float(sigma))

  def run(params, noise_b, labels_b):
    denoise, x_T, grid = teacher_method.sampling_setup(params, noise_b, num_steps, guidance)
    cond = cond_lib.Conditioning(labels=labels_b if teacher_method.conditional else None)
    return samplers.SAMPLERS[sampler](denoise, x_T, grid, None, cond, record), grid

  run = jax.jit(run)
  states, outputs, grid = [], [], None
  for start in tqdm(range(0, len(noise), batch_size), desc="teacher trajectories",
                    disable=not progress, unit="batch"):
    seen.clear()
    lab = None if labels is None else jnp.asarray(labels[start:start + batch_size])
    x_final, grid = run(teacher_params, jnp.asarray(noise[start:start + batch_size]), lab)
    x_final = np.asarray(jax.device_get(x_final), np.float64)
    if sorted(seen) != list(range(num_steps)):
      raise RuntimeError(f"the {sampler} sampler reported steps {sorted(seen)} of {num_steps}")
    xs = np.stack([seen[i][0] for i in range(num_steps)])
    ds = np.stack([seen[i][1] for i in range(num_steps)])
    sig = np.array([seen[i][2] for i in range(num_steps)])
    shape = (num_steps,) + (1,) * (xs.ndim - 1)
    outputs.append((xs - ds) / sig.reshape(shape))
    states.append(np.concatenate([xs / vp_scale(sig).reshape(shape), x_final[None]]))
  return (np.concatenate(states, axis=1), np.concatenate(outputs, axis=1),
          np.asarray(jax.device_get(grid), np.float64))


def fit_coefficients(states, outputs, grid, n: int, path: str = "search",
                     iterations: int = 30, tolerance: float = 10.0,
                     basis: str = "current") -> dict:
  """The fitted scheduler as numpy arrays: path, sigmas (its levels), wx, we, errors."""
  num_teacher = outputs.shape[0]
  if path == "search":
    chosen, _ = olss_solver.search_path(states, outputs, n, iterations, tolerance)
  elif path == "uniform":
    chosen = olss_solver.uniform_path(num_teacher, n)
  else:
    raise ValueError(f"unknown method.path {path!r}; choose from {PATHS}")
  wx, we, errors = olss_solver.fit_path(states, outputs, chosen, basis)
  return {"path": np.asarray(chosen, np.int32), "sigmas": np.asarray(grid, np.float32)[chosen],
          "wx": wx.astype(np.float32), "we": we.astype(np.float32),
          "errors": errors.astype(np.float32)}


class OLSS:
  """A fitted few-step scheduler for a frozen diffusion teacher (see the module doc)."""

  name = "olss"
  guidance_kind = None  # w is fixed by the fit (method.guidance); refit for another

  def __init__(self, net, config):
    del net  # the teacher's own network samples; config.model only shapes nothing here
    self.config = config
    self.cfg = config.method
    self.data_cfg = config.data
    self.image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
    self.steps = int(self.cfg.steps)
    olss_solver.check_steps(int(self.cfg.teacher_steps), self.steps)
    self.basis = olss_solver.check_basis(self.cfg.get("basis", "current"))
    if self.cfg.path not in PATHS:
      raise ValueError(f"unknown method.path {self.cfg.path!r}; choose from {PATHS}")
    if int(self.cfg.num_trajectories) < 1 or int(self.cfg.trajectory_batch) < 1:
      raise ValueError("method.num_trajectories and method.trajectory_batch must be >= 1")
    self._teacher: Optional[teachers.TeacherRun] = None
    self.teacher_identity = None

  # -- the teacher ------------------------------------------------------------------------------

  def _check_teacher(self, tcfg, workdir):
    if tcfg.method.name not in TEACHER_METHODS:
      raise ValueError(f"OLSS fits the sampler of a diffusion teacher ({TEACHER_METHODS}); "
                       f"{workdir} is a {tcfg.method.name!r} run")
    bad = teachers.data_mismatches(tcfg, self.config)
    if bad:
      raise ValueError(f"OLSS teacher {workdir} models other data: {'; '.join(bad)}")
    if float(self.cfg.guidance) and not float(tcfg.method.get("label_dropout", 0.0) or 0.0):
      raise ValueError(f"method.guidance={self.cfg.guidance} needs a teacher trained with "
                       f"label dropout; {workdir} has none")

  def load_teacher(self):
    """The teacher's weights (its run is kept for the fit and for sampling)."""
    run = teachers.load_teacher_run(self.cfg, "OLSS", "a trained edm or vp run",
                                    check=self._check_teacher)
    self._teacher = run
    self.teacher_identity = run.identity()
    return run.params

  def fitted_method_fields(self) -> dict:
    """What the fitted run's config records: the teacher's step (read again at sampling)
    and its identity (checked then)."""
    return {"teacher_step": int(self._teacher.step),
            teachers.IDENTITY_KEY: self.teacher_identity}

  def teacher_sampler(self) -> str:
    return self.cfg.teacher_sampler or self._teacher.config.sample.sampler

  # -- fitting ----------------------------------------------------------------------------------

  def trajectory_labels(self) -> Optional[np.ndarray]:
    """0, 1, ..., cycling over the classes: every class in the fit in equal parts."""
    k = int(self.data_cfg.num_classes)
    b = int(self.cfg.num_trajectories)
    return None if k <= 0 else (np.arange(b) % k).astype(np.int32)

  def abstract_fit_params(self):
    n, b = self.steps, int(self.cfg.num_trajectories)
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    return {"path": jax.ShapeDtypeStruct((n,), jnp.int32), "sigmas": f32(n), "wx": f32(n),
            "we": f32(n, n), "errors": f32(n),
            "labels": jax.ShapeDtypeStruct((b,), jnp.int32)}

  def fit(self, teacher_params, rng, data_iterator):
    del data_iterator  # OLSS samples the teacher; it reads no data
    if self._teacher is None:
      self.load_teacher()
    if teacher_params is None:
      teacher_params = self._teacher.params
    b = int(self.cfg.num_trajectories)
    noise = np.asarray(jax.random.normal(rng, (b,) + self.image_shape, jnp.float32))
    labels = self.trajectory_labels()
    states, outputs, grid = record_trajectories(
        self._teacher.method, teacher_params, noise, labels, sampler=self.teacher_sampler(),
        num_steps=int(self.cfg.teacher_steps), guidance=float(self.cfg.guidance),
        batch_size=int(self.cfg.trajectory_batch), progress=True)
    fitted = fit_coefficients(states, outputs, grid, self.steps, self.cfg.path,
                              int(self.cfg.search_iterations), float(self.cfg.search_tolerance),
                              self.basis)
    fitted["labels"] = labels if labels is not None else np.zeros((b,), np.int32)
    print(f"OLSS ({self.cfg.path}, basis {self.basis}): path {fitted['path'].tolist()} of "
          f"{self.cfg.teacher_steps} {self.teacher_sampler()} steps, per-step fit MSE "
          f"{' '.join(f'{v:.2e}' for v in fitted['errors'])}")
    return fitted

  # -- reading the run --------------------------------------------------------------------------

  @classmethod
  def checkpoint_step_for(cls, config, num_steps: int) -> int:
    """The fitted run's one checkpoint, when `num_steps` is the step count it was fitted for."""
    n = int(config.method.steps)
    if int(num_steps) != n:
      raise ValueError(f"this OLSS run was fitted for {n} steps, not {num_steps}: sample it "
                       f"with --steps {n}, or fit another with --config.method.steps="
                       f"{num_steps}")
    return 0

  def sampling_params(self, fitted):
    """{'olss': the coefficients, 'teacher': the teacher's weights}, after checking that the
    teacher run still holds the weights the coefficients were fitted on (one line if not)."""
    if isinstance(fitted, dict) and "teacher" in fitted:
      return fitted
    recorded = self.cfg.get(teachers.IDENTITY_KEY)
    try:
      self.load_teacher()
    except (ValueError, FileNotFoundError) as e:
      raise ValueError(f"the teacher these OLSS coefficients were fitted on cannot be read "
                       f"({e})") from None
    if recorded and recorded != self.teacher_identity:
      raise ValueError(f"these OLSS coefficients were fitted on teacher {recorded} of "
                       f"{self.cfg.teacher_workdir}, which now holds {self.teacher_identity}: "
                       f"refit them for this teacher")
    return {"olss": fitted, "teacher": self._teacher.params}

  def check_sample_options(self, num_steps: int, sampler=None, **options) -> None:
    """One-line ValueErrors for what the fitted scheduler cannot do (sampling.generate
    asks before reading the teacher)."""
    if sampler not in (None, "olss") or options:
      raise ValueError(f"an OLSS run samples with its fitted scheduler only; got sampler "
                       f"{sampler!r} and options {sorted(options)}")
    if int(num_steps) != self.steps:
      raise ValueError(f"this OLSS run was fitted for {self.steps} steps, not {num_steps}: "
                       f"fit another with --config.method.steps={num_steps}")

  def nfe(self, num_steps: int, sampler=None) -> int:
    del sampler
    return int(num_steps) * (2 if float(self.cfg.guidance) else 1)

  def uses_target(self) -> bool:
    return False

  def target_decay(self, step):
    return jnp.zeros((), jnp.float32)

  # -- sampling ---------------------------------------------------------------------------------

  def sample(self, params, noise, keys, labels, num_steps: int, sampler=None, **options):
    """Images in [-1, 1]: the fitted scheduler of the module doc, one teacher evaluation per
    step (two with guidance). `params` from sampling_params; `keys` are unused."""
    del keys
    self.check_sample_options(num_steps, sampler, **options)
    if not (isinstance(params, dict) and "teacher" in params):
      raise ValueError("OLSS.sample needs sampling_params(fitted) (the coefficients and the "
                       "teacher's weights)")
    fitted, tparams = params["olss"], params["teacher"]
    n = fitted["wx"].shape[0]
    if self._teacher is None:
      raise ValueError("OLSS.sample: load the teacher with sampling_params first")
    tm = self._teacher.method
    denoise, x_T, grid = tm.sampling_setup(tparams, noise, int(self.cfg.teacher_steps),
                                           float(self.cfg.guidance))
    z_T = x_T / jnp.sqrt(1.0 + jnp.square(grid[0]))
    cond = cond_lib.Conditioning(labels=labels if tm.conditional else None)
    sigmas = jnp.asarray(fitted["sigmas"], jnp.float32)
    wx, we = jnp.asarray(fitted["wx"], jnp.float32), jnp.asarray(fitted["we"], jnp.float32)
    batch = noise.shape[0]

    def body(carry, j):
      z, history = carry
      s = sigmas[j]
      x = z * jnp.sqrt(1.0 + s * s)
      d = jnp.asarray(denoise(x, jnp.full((batch,), s, jnp.float32), cond), jnp.float32)
      history = history.at[j].set((x - d) / s)
      # we[j, m] = 0 for m > j: the rows not yet written (zeros) add nothing.
      z_next = wx[j] * (z if self.basis == "current" else z_T) + jnp.tensordot(
          we[j], history, axes=1)
      return (z_next, history), None

    init = (z_T, jnp.zeros((n,) + z_T.shape, jnp.float32))
    (z, _), _ = jax.lax.scan(body, init, jnp.arange(n))
    return jnp.clip(z, -1.0, 1.0)
