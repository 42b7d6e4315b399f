"""Training in rounds (progressive distillation's outer loop, Salimans & Ho 2022 Alg. 2).

A test-only method on TinyNet (tests/cm_testlib.py) runs 3 rounds of 3 steps; its loss
fits the data and distils the round's teacher (ctx.teacher_params['teacher']), weighted by
a frozen network from load_teacher() and by ctx.round, so all three reach the loss. The
run in one go is compared bit for bit with runs stopped mid-round (step 4) and exactly at
a round boundary (step 3), then continued. Checkpoints of runs without rounds must still
restore into today's abstract state.
"""
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cm_jax.train import builders, loop, rounds
from cm_jax.train.checkpoint import RunCheckpoints, abstract_like
from cm_jax.train.optim import build_optimizer
from cm_jax.train.restore import restore_train_state
from cm_jax.train.state import TrainState, create_train_state
from cm_testlib import BATCH, TinyNet
from configs import digits_edm

NUM_ROUNDS, STEPS_PER_ROUND = 3, 3
TOTAL = NUM_ROUNDS * STEPS_PER_ROUND


class ToyRounds:
  """Each round: denoise the data and match the previous round's student."""
  name = "toy_rounds"

  def __init__(self, net, config):
    self.net, self.config = net, config

  def rounds(self):
    return NUM_ROUNDS, STEPS_PER_ROUND

  def uses_target(self):
    return False

  def target_decay(self, step):
    return jnp.float32(0.0)

  def load_teacher(self):
    return {"anchor": {"weight": jnp.float32(0.5)}}

  def _apply(self, params, x, sigma, labels):
    return self.net.apply({"params": params}, x, sigma, labels)

  def loss(self, params, batch, rng, ctx):
    x, labels = batch["image"], batch["label"]
    sigma = jnp.full((x.shape[0],), 0.5, jnp.float32) * (1.0 + ctx.round.astype(jnp.float32))
    noisy = x + sigma[:, None, None, None] * jax.random.normal(rng, x.shape)
    out = self._apply(params, noisy, sigma, labels)
    teacher = jax.lax.stop_gradient(self._apply(ctx.teacher_params["teacher"], noisy, sigma,
                                                labels))
    weight = ctx.teacher_params["anchor"]["weight"]
    loss = jnp.mean((out - x) ** 2) + weight * jnp.mean((out - teacher) ** 2)
    return loss, {"loss": loss}


def _config():
  c = digits_edm.get_config("tiny")
  c.method.name = ToyRounds.name
  c.optim.update(warmup_steps=2)  # a schedule whose counter must restart every round
  c.training.update(batch_size=BATCH, log_every=1, save_every=STEPS_PER_ROUND, sample_every=0)
  return c


def _build_parts(config):
  return builders.RunParts(image_shape=(8, 8, 1), net=TinyNet(num_classes=10),
                           method=ToyRounds(TinyNet(num_classes=10), config),
                           optimizer=build_optimizer(config.optim))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  """(config, workdir, state) of the 9-step run in one go (checkpoints at 3, 6, 9)."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(builders, "build_parts", _build_parts)
    config = _config()
    workdir = str(tmp_path_factory.mktemp("rounds_straight"))
    state = loop.train(config, workdir, progress=False)
    yield config, workdir, state


def _equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _counts(opt_state):
  """Every step counter in the optimizer state (adam's and the lr schedule's)."""
  return {int(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]
          if getattr(path[-1], "name", None) == "count"}


def _checkpoint(workdir, like, step):
  ckpts = RunCheckpoints(workdir, read_only=True)
  try:
    return ckpts.restore(abstract_like(like), step)[0]
  finally:
    ckpts.close()


def test_rounds_switch_teacher_and_restart_the_optimizer(toy):
  config, workdir, state = toy
  assert int(state.step) == TOTAL and int(state.round) == NUM_ROUNDS - 1
  assert _counts(state.opt_state) == {STEPS_PER_ROUND}  # restarted at step 6
  at3, at6 = (_checkpoint(workdir, state, s) for s in (3, 6))
  # A boundary checkpoint holds the finished round: the switch comes with the next step.
  assert int(at3.round) == 0 and int(at6.round) == 1
  assert _counts(at6.opt_state) == {STEPS_PER_ROUND}
  # Algorithm 2: the round's teacher is the previous round's final student.
  _equal(state.round_teacher, at6.params)
  _equal(at6.round_teacher, at3.params)
  # Readers build the round fields from the config alone.
  restored, step = restore_train_state(workdir, config, _build_parts(config))
  assert step == TOTAL
  _equal(restored, state)


@pytest.mark.parametrize("stop_at", [4, 3], ids=["mid_round", "at_boundary"])
def test_interrupted_run_resumes_exactly(toy, tmp_path, monkeypatch, stop_at):
  config, _, straight = toy
  monkeypatch.setattr(builders, "build_parts", _build_parts)
  workdir = str(tmp_path / "resumed")
  first = loop.train(config, workdir, num_steps=stop_at, progress=False)
  assert int(first.round) == (stop_at - 1) // STEPS_PER_ROUND
  if stop_at == 4:  # one step into round 1: a fresh optimizer has counted one step
    assert _counts(first.opt_state) == {1}
    _equal(first.round_teacher, _checkpoint(workdir, first, 3).params)
  resumed = loop.train(config, workdir, progress=False)
  _equal(resumed, straight)


def test_rounds_under_pmap(tmp_path, monkeypatch):
  monkeypatch.setattr(builders, "build_parts", _build_parts)
  config = _config()
  config.parallel = "pmap"
  workdir = str(tmp_path / "pmap")
  state = loop.train(config, workdir, num_steps=4, progress=False)
  assert int(state.round) == 1 and _counts(state.opt_state) == {1}
  _equal(state.round_teacher, _checkpoint(workdir, state, 3).params)


def test_steps_past_the_last_round_are_refused(tmp_path, monkeypatch):
  monkeypatch.setattr(builders, "build_parts", _build_parts)
  with pytest.raises(ValueError, match="past its last round"):
    loop.train(_config(), str(tmp_path / "w"), num_steps=TOTAL + 1, progress=False)


def test_next_round_resets_optimizer_ema_and_target():
  params = {"w": jnp.arange(3.0)}
  opt = optax.adam(1e-3)
  state = create_train_state(params, opt, ("halflife",), True, round_teacher=params)
  state = state.replace(params={"w": params["w"] + 1.0},
                        opt_state=opt.update({"w": jnp.ones(3)}, state.opt_state)[1])

  class Hook:
    def start_round(self, index, params, teacher):
      return {"w": params["w"] * 2.0}, {"w": teacher["w"] - 1.0}

  new = rounds.next_round(Hook(), opt, state, 1)
  _equal(new.params, {"w": (jnp.arange(3.0) + 1.0) * 2.0})
  _equal(new.round_teacher, {"w": jnp.arange(3.0) - 1.0})
  _equal(new.ema["halflife"], new.params)
  _equal(new.target_params, new.params)
  _equal(new.opt_state, opt.init(new.params))
  assert int(new.round) == 1 and int(new.step) == int(state.step)

  class BadHook:
    def start_round(self, index, params, teacher):
      return {"w": jnp.zeros(4)}, teacher

  with pytest.raises(ValueError, match="shapes"):
    rounds.next_round(BadHook(), opt, state, 1)


def test_round_teacher_joins_load_teachers_networks():
  assert rounds.teachers_for_loss({"a": 1}, None) == {"a": 1}
  assert rounds.teachers_for_loss(None, 2) == {"teacher": 2}
  assert rounds.teachers_for_loss({"a": 1}, 2) == {"a": 1, "teacher": 2}
  with pytest.raises(ValueError, match="'teacher' key"):
    rounds.teachers_for_loss({"teacher": 1}, 2)


@flax.struct.dataclass
class _TrainStateBeforeRounds:
  """cm_jax.train.state.TrainState as it was before rounds (flax.struct, five fields)."""
  step: jax.Array
  params: dict
  opt_state: tuple
  ema: dict
  target_params: dict = None


def test_checkpoints_written_before_rounds_still_restore(tmp_path):
  params = {"conv": {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.ones(3)}}
  opt = optax.adam(1e-3)
  for target in (None, params):
    old = _TrainStateBeforeRounds(step=jnp.int32(7), params=params, opt_state=opt.init(params),
                                  ema={"halflife": params}, target_params=target)
    workdir = str(tmp_path / f"old_{target is None}")
    ckpts = RunCheckpoints(workdir, async_save=False)
    ckpts.save(7, old, {}, _config(), wait=True)
    ckpts.close()
    today = create_train_state(params, opt, ("halflife",), target is not None)
    assert today.round is None and today.round_teacher is None
    restored = _checkpoint(workdir, today, 7)
    assert isinstance(restored, TrainState) and restored.round is None
    assert int(restored.step) == 7
    _equal(restored.params, params)
    _equal(restored.ema, {"halflife": params})
    _equal(restored.target_params, target)
