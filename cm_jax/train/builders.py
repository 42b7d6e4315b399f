"""From a config to the pieces of a run: data shape, network, method, optimizer, state.

train.py, sample.py and evaluate.py all build through here, so a checkpoint
written by one is read by the others with the same tree structure.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import optax

from cm_jax import data as data_lib
from cm_jax import runs
from cm_jax.methods import build_method, network_input_shape
from cm_jax.nets import build_network
from cm_jax.nets import example_inputs as nets_example_inputs
from cm_jax.nets import init_inputs as nets_init_inputs
from cm_jax.train import ema as ema_lib
from cm_jax.train import rounds
from cm_jax.train.optim import build_optimizer
from cm_jax.train.state import TrainState, create_train_state, fitted_train_state


@dataclasses.dataclass
class RunParts:
  image_shape: tuple[int, int, int]  # what the network takes (and samplers draw noise in)
  net: nn.Module
  method: object
  optimizer: optax.GradientTransformation


def build_parts(config) -> RunParts:
  """Shapes come from the config alone (no data is read), so a dry run, sample.py and
  evaluate.py work without the data set; training checks the data against them."""
  shape = network_input_shape(config)  # the data's, or a latent method's latent shape
  net = build_network(config.model, image_size=shape[0], channels=shape[-1],
                      num_classes=config.data.num_classes)
  return RunParts(image_shape=shape, net=net,
                  method=build_method(net, config), optimizer=build_optimizer(config.optim))


def check_data_matches(config, info: "data_lib.DatasetInfo") -> None:
  """The network is shaped by config.data; refuse data that does not fit it."""
  if info.channels != config.data.channels:
    raise ValueError(f"the data set has {info.channels} channel(s) but config.data.channels="
                     f"{config.data.channels}; set --config.data.channels={info.channels}")


def example_inputs(parts: RunParts, config, batch: int = 1):
  """Dummy (x, noise_cond, labels, cond) that fix every parameter's shape."""
  return nets_example_inputs(config, batch, image_shape=parts.image_shape)


def init_params(parts: RunParts, config, rng: jax.Array):
  args, kwargs = nets_init_inputs(config, parts.image_shape)
  return parts.net.init({"params": rng}, *args, **kwargs)["params"]


def new_train_state(parts: RunParts, config, rng: jax.Array, teacher_params=None) -> TrainState:
  """A fresh state. A method with `initial_params(params, teacher_params)` (consistency
  distillation starts the student from the teacher) chooses the starting weights."""
  params = init_params(parts, config, rng)
  start_from = getattr(parts.method, "initial_params", None)
  if start_from is not None:
    params = start_from(params, teacher_params)
  round_teacher = None
  if rounds.round_plan(parts.method) is not None:
    params, round_teacher = rounds.start_round(parts.method, 0, params, teacher_params)
  return create_train_state(params, parts.optimizer, ema_lib.ema_names(config.ema),
                            parts.method.uses_target(), round_teacher=round_teacher)


def abstract_train_state(parts: RunParts, config) -> TrainState:
  """Shapes and dtypes of the train state, without allocating it (jax.eval_shape).

  A fitted method's run (cm_jax.train.fit) holds only the fitted pytree, whose shapes
  the method gives with `abstract_fit_params()`.
  """
  if hasattr(parts.method, "fit"):
    return jax.eval_shape(fitted_train_state, parts.method.abstract_fit_params())
  return jax.eval_shape(lambda rng: new_train_state(parts, config, rng), jax.random.key(0))


def params_for_sampling(state: TrainState, which: str, ema_cfg):
  """'online' -> the trained params; 'ema' -> the half-life EMA if the run keeps one,
  else its first fixed-rate EMA; anything else names an EMA copy (cm_jax.runs.choose_copy,
  the rule load_run follows)."""
  name = runs.choose_copy(which, ema_lib.ema_names(ema_cfg))
  if name == "online":
    return state.params
  if name not in state.ema:
    raise ValueError(f"no EMA named {name!r} in this run; it has {sorted(state.ema)} "
                     f"(or use 'online' / 'ema')")
  return state.ema[name]
