"""The frozen teacher of a distillation method: a trained run read from its workdir.

Consistency distillation, guided distillation and progressive distillation all name
their teacher with the same config.method fields (teacher_workdir, teacher_params,
teacher_step) and refuse an unusable one in one line before anything is compiled.
The teacher is evaluated with its own method object (its network, schedule and
parameterisation), so only the data it models, and the network when the student
starts from its weights, must agree with the student.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cm_jax import runs

# Network fields that do not change the parameters: a teacher may differ in these
# (the reference distils a dropout-0.1 teacher into a dropout-0 student).
MODEL_FIELDS_FREE = ("dropout", "dtype", "remat")
# Network fields that only add layers to the student, which then start fresh.
MODEL_FIELDS_NEW_LAYERS = ("cond_dim",)
_MODEL_DEFAULTS = {"null_class": False, "out_channels_factor": 1}


@dataclasses.dataclass
class TeacherRun:
  workdir: str
  config: Any    # the teacher run's own config
  params: Any    # the chosen copy of its weights
  method: Any    # its method object (denoiser(params), null_class, ...)
  step: int

  def identity(self) -> str:
    """What a student run records of its teacher, to refuse resuming against another:
    'step <n> sha256 <first 16 hex digits of params_sha256>'."""
    return f"step {self.step} sha256 {params_sha256(self.params)[:16]}"


def params_sha256(params) -> str:
  """sha256 over every leaf's path, dtype, shape and bytes, in path order."""
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0],
                           key=lambda kv: jax.tree_util.keystr(kv[0])):
    a = np.asarray(jax.device_get(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def teacher_method(tcfg):
  """The teacher run's own method object (network built from its own model config)."""
  # Lazy: cm_jax.methods imports the modules that import this one.
  from cm_jax.methods import build_method  # pylint: disable=g-import-not-at-top
  from cm_jax.nets import build_network  # pylint: disable=g-import-not-at-top
  net = build_network(tcfg.model, image_size=tcfg.data.image_size,
                      channels=tcfg.data.channels, num_classes=tcfg.data.num_classes)
  return build_method(net, tcfg)


def load_teacher_run(mcfg, what: str, kinds: str,
                     check: Optional[Callable[[Any, str], None]] = None) -> TeacherRun:
  """The run config.method.teacher_workdir names, its `teacher_params` copy at
  `teacher_step` (-1: the latest). `check(tcfg, workdir)` may refuse it (raise a one-line
  ValueError) after its config is read and before any weights are."""
  wd = mcfg.teacher_workdir
  if not wd:
    raise ValueError(f"{what} needs a teacher: set --config.method.teacher_workdir=<{kinds}>")
  if not runs.is_remote(wd) and not os.path.isdir(runs.checkpoint_dir(wd)):
    raise FileNotFoundError(
        f"{what}: teacher run {wd!r} has no checkpoints: train the teacher there first "
        f"or point --config.method.teacher_workdir at {kinds}")
  step = None if int(mcfg.teacher_step) < 0 else int(mcfg.teacher_step)
  tcfg = runs.load_config(wd, step)
  if check is not None:
    check(tcfg, wd)
  # Only the chosen copy of the teacher's weights is read (cm_jax.runs), not its train state.
  run = runs.load_run(wd, mcfg.teacher_params, step)
  return TeacherRun(workdir=wd, config=tcfg, params=run.params, method=teacher_method(tcfg),
                    step=run.step)


IDENTITY_KEY = "teacher_identity"   # config.method field the trainer writes (loop.py)
OVERRIDE_KEY = "allow_new_teacher"  # config.method field that lets a run change teacher


def check_same_teacher(saved: Optional[str], current: Optional[str], allow: bool) -> None:
  """A run resumed against another teacher than it started with trains towards another
  target: refuse it in one line, unless the user says so (method.allow_new_teacher)."""
  if saved and current and saved != current and not allow:
    raise ValueError(f"this run was trained against teacher {saved}, but the teacher run "
                     f"now holds {current}; point method.teacher_workdir / teacher_step at the "
                     f"original, or pass --config.method.{OVERRIDE_KEY}=True to continue "
                     f"against the new one")


def _model_field(model_cfg, key):
  """A model field for comparison; fields older runs lack read as their defaults."""
  v = model_cfg.get(key, _MODEL_DEFAULTS.get(key))
  return tuple(v) if isinstance(v, (list, tuple)) else v


def data_mismatches(tcfg, config) -> list[str]:
  """What differs between the data the teacher and the student model."""
  # config.data.channels shapes the network, so the configs say it without reading data.
  return [f"data.{key} {tcfg.data.get(key)!r} != student's {config.data.get(key)!r}"
          for key in ("image_size", "channels", "num_classes")
          if tcfg.data.get(key) != config.data.get(key)]


def model_mismatches(tcfg, config, new_layers=MODEL_FIELDS_NEW_LAYERS) -> list[str]:
  """What differs between the networks, ignoring fields that leave the shared parameters
  alone (MODEL_FIELDS_FREE) and the `new_layers` fields the student may add."""
  problems = []
  for key in sorted(set(tcfg.model) | set(config.model)):
    if key in MODEL_FIELDS_FREE or key in new_layers:
      continue
    t, s = _model_field(tcfg.model, key), _model_field(config.model, key)
    if t != s:
      problems.append(f"model.{key} {t!r} != student's {s!r}")
  return problems


def vp_start_mismatches(tcfg, config, new_layers=()) -> list[str]:
  """Why a VP student (guided, progressive, multistep) cannot start from, or be, this VP
  run's network: the network apart from `new_layers`, the output parameterisation and the
  schedule must be the student's, since the student is that network on that schedule."""
  problems = model_mismatches(tcfg, config, new_layers=new_layers)
  if tcfg.method.get("prediction") != config.method.prediction:
    problems.append(f"method.prediction {tcfg.method.get('prediction')!r} != student's "
                    f"{config.method.prediction!r}")
  tsched = dict(tcfg.get("schedule", {}) or {})
  if tsched != dict(config.schedule):
    problems.append(f"schedule {tsched} != student's {dict(config.schedule)}")
  return problems


def _flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def shared_params_mismatch(teacher, student) -> str:
  """'' when every teacher parameter exists in the student with its shape, else the
  first offending names (the student may have more: those start fresh)."""
  t, s = _flat(teacher), _flat(student)
  bad = [k for k in t if k not in s or tuple(t[k].shape) != tuple(s[k].shape)]
  return ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else "")


def start_from_teacher(params, teacher_params, enabled: bool):
  """A student's initial_params: `params` with every leaf the teacher also has taken from
  it (`init_from`) when `enabled` and the teacher is loaded (teacher_params is None when only
  shapes are traced); teacher_params is load_teacher()'s {'teacher': ...} or the weights."""
  if teacher_params is None or not enabled:
    return params
  teacher = teacher_params["teacher"] if isinstance(teacher_params, dict) else teacher_params
  return init_from(params, teacher)


def guidance_problems(tcfg, guidance: float) -> list[str]:
  """Why a teacher run cannot be guided with w = `guidance` (method.teacher_guidance), if
  it cannot: guidance needs the null class that label dropout trains."""
  if not guidance:
    return []
  from cm_jax.nets import null_class_index  # pylint: disable=g-import-not-at-top
  if null_class_index(tcfg.model, tcfg.data.num_classes) is None:
    return ["method.teacher_guidance needs a teacher trained with a null class "
            "(model.null_class=True, method.label_dropout > 0)"]
  return []


def init_from(params, teacher):
  """`params` with every leaf the teacher also has replaced by the teacher's value."""
  t = _flat(teacher)

  def pick(path, p):
    key = "/".join(str(getattr(k, "key", k)) for k in path)
    return jnp.asarray(t[key], p.dtype) if key in t else p

  return jax.tree_util.tree_map_with_path(pick, params)
