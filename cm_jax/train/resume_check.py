"""Refusing, in one line, to resume a run directory with a config that builds another train
state (another method, network, data shape or set of EMAs): Orbax would only report that
two tree structures differ, and only after everything was built."""
from __future__ import annotations

from cm_jax.methods import teachers
from cm_jax.runs import ema_names


def differences(saved, config) -> list[str]:
  """What the run's saved config and `config` disagree on that shapes the train state."""
  out = []
  if saved.method.name != config.method.name:
    out.append(f"method.name {saved.method.name!r} != {config.method.name!r}")
  # Both directions: new fields, removed fields and changed values all change the tree.
  mismatched = teachers.model_mismatches(saved, config, new_layers=())
  out += [m.replace("student's ", "") for m in mismatched]
  out += [m.replace("student's ", "") for m in teachers.data_mismatches(saved, config)]
  if ema_names(saved.ema) != ema_names(config.ema):
    out.append(f"EMAs {list(ema_names(saved.ema))} != {list(ema_names(config.ema))}")
  return out


def check_same_run(saved, config, directory: str) -> None:
  problems = differences(saved, config)
  if problems:
    shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3
                                       else "")
    raise ValueError(f"{directory} holds a run with another train state than this config "
                     f"builds (saved != now: {shown}); resume it with the config it was "
                     f"trained with, or give a new --workdir")
