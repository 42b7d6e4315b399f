"""The mechanical torch <-> Flax naming rule of cm_jax.utils.torch_names, on a small
torch module whose Flax twin names its submodules the same way."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cm_jax.utils.torch_names import params_from_state_dict, state_dict_from_params


class TorchBlock(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.norm = torch.nn.GroupNorm(2, 4)
    self.conv1 = torch.nn.Conv2d(4, 6, 3)
    self.to_out = torch.nn.ModuleList([torch.nn.Linear(6, 5), torch.nn.Dropout()])
    self.linear_1 = torch.nn.Linear(5, 3)   # a real attribute name ending in _1
    self.emb = torch.nn.Embedding(7, 4)
    self.register_buffer("position_ids", torch.arange(3))


class FlaxBlock(nn.Module):
  @nn.compact
  def __call__(self, x, ids):
    h = nn.GroupNorm(2, name="norm")(x)
    h = nn.Conv(6, (3, 3), padding="VALID", name="conv1")(h)
    h = nn.Dense(5, name="to_out_0")(h)
    return nn.Dense(3, name="linear_1")(h) + nn.Embed(7, 4, name="emb")(ids).sum()


@pytest.fixture(scope="module")
def pair():
  torch.manual_seed(0)
  block = TorchBlock()
  state = {k: v.detach().numpy().copy() for k, v in block.state_dict().items()}
  abstract = jax.eval_shape(FlaxBlock().init, jax.random.key(0), jnp.zeros((1, 5, 5, 4)),
                            jnp.zeros((1,), jnp.int32))["params"]
  return state, abstract


def test_conversion_layouts_and_exact_round_trip(pair):
  state, abstract = pair
  params = params_from_state_dict(state, abstract, ignore=("position_ids",))
  np.testing.assert_array_equal(params["conv1"]["kernel"],
                                state["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["to_out_0"]["kernel"], state["to_out.0.weight"].T)
  np.testing.assert_array_equal(params["linear_1"]["kernel"], state["linear_1.weight"].T)
  np.testing.assert_array_equal(params["norm"]["scale"], state["norm.weight"])
  np.testing.assert_array_equal(params["emb"]["embedding"], state["emb.weight"])
  back = state_dict_from_params(params)
  assert set(back) == set(state) - {"position_ids"}
  for k, v in back.items():
    np.testing.assert_array_equal(v, state[k])


def test_missing_extra_and_misshapen_tensors_are_one_line_errors(pair):
  state, abstract = pair
  ignore = ("position_ids",)
  cases = [
      ({k: v for k, v in state.items() if k != "to_out.0.bias"}, "'to_out.0.bias' is missing"),
      ({**state, "conv2.weight": state["conv1.weight"]}, "'conv2.weight' has no place"),
      ({**state, "conv1.weight": state["conv1.weight"][:, :2]}, "'conv1.weight' has shape"),
  ]
  for bad, words in cases:
    with pytest.raises(ValueError) as err:
      params_from_state_dict(bad, abstract, what="unet", ignore=ignore)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith("unet: ")
