"""Tests of LoRA on Flax parameter trees (cm_jax.nets.lora) and its files
(cm_jax.nets.lora_files): a fresh adapter leaves the network as it was, the merge is W +
scale * A.B, a saved file (PEFT / diffusers format) and a kohya-ss file load into diffusers'
pipeline with the same effect as merge_lora has on the Flax UNet, files round-trip, and files
for another network, or not LoRA at all, are one-line errors."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")  # diffusers' load_lora_weights needs it

import sd_tiny  # noqa: E402
from cm_jax.nets.lora import (ATTENTION_TARGETS, LCM_LORA_TARGETS, init_lora,  # noqa: E402
                              lora_paths, merge_lora)
from cm_jax.nets.lora_files import (WEIGHT_NAME, load_lora_file, peft_state_dict,  # noqa: E402
                                    save_lora_file)
from cm_jax.nets.sd_unet import UNet2DCondition  # noqa: E402
from cm_jax.utils.torch_names import (params_from_state_dict, state_dict_from_params,  # noqa: E402
                                      torch_key)

B, L, RANK = 2, 5, 4
# Jitted once and shared: eager, the first merge compiles each small op per kernel shape.
merge = jax.jit(merge_lora)
TO_Q = ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn1", "to_q")
CONV1 = ("down_blocks_1", "resnets_0", "conv1")


def _abstract(net):
  x, t, ctx = np.zeros((1, 8, 8, 4)), np.zeros((1,)), np.zeros((1, L, 16))
  return jax.eval_shape(lambda: net.init(jax.random.key(0), x, t, context=ctx))["params"]


@pytest.fixture(scope="module")
def unet(tiny_sd_folder):
  """(Flax net, Flax params of the tiny pipeline's UNet, jitted apply, inputs, base output)."""
  model = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(tiny_sd_folder, "unet"))
  net = UNet2DCondition.from_config(dict(model.config))
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  params = params_from_state_dict(sd, _abstract(net), what="tiny unet")
  apply = jax.jit(lambda p, x, t, ctx: net.apply({"params": p}, x, t, context=ctx))
  rng = np.random.RandomState(0)
  inputs = (rng.randn(B, 8, 8, 4).astype(np.float32), np.array([10.0, 700.0], np.float32),
            rng.randn(B, L, 16).astype(np.float32))
  return net, params, apply, inputs, np.asarray(apply(params, *inputs))


def random_lora(params, seed=1):
  """An adapter as training leaves it: A as initialised, B no longer zero."""
  lora = init_lora(jax.random.key(seed), params, RANK)
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, v: (rng.randn(*v.shape).astype(np.float32) * 0.2
                       if path[-1].key == "lora_B" else np.asarray(v)), lora)


def kohya_file(path, lora, alphas):
  """The kohya-ss file of `lora` (scale alpha / RANK per module): lora_unet_* names."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  state = {}
  for key, value in peft_state_dict(lora, 1.0, prefix=None).items():
    module, _, kind = key.rpartition(".lora_")
    name = "lora_unet_" + module.replace(".", "_")
    state[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value
    state[f"{name}.alpha"] = np.asarray(alphas[module], np.float32)
  save_file(state, str(path))
  return str(path)


def module_names(lora):
  """The torch names of the adapted modules."""
  return [torch_key(k[:-1]) for k in traverse_util.flatten_dict(lora) if k[-1] == "lora_A"]


def scale_b(lora, alphas):
  """`lora` with each module's kohya scale alpha / RANK folded into its B."""
  return traverse_util.unflatten_dict({
      k: v * np.float32(alphas[torch_key(k[:-1])] / RANK) if k[-1] == "lora_B" else v
      for k, v in traverse_util.flatten_dict(lora).items()})


def flat_close(a, b, atol):
  fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_allclose(np.asarray(fa[k]), np.asarray(fb[k]), atol=atol, rtol=0,
                               err_msg="/".join(k))


def one_line_error(fn, *words):
  with pytest.raises(ValueError) as info:
    fn()
  msg = str(info.value)
  assert "\n" not in msg, msg
  for word in words:
    assert word in msg, msg


def test_init_is_the_base_network(unet):
  _, params, _, _, _ = unet
  paths = lora_paths(params, LCM_LORA_TARGETS)
  assert TO_Q in paths and CONV1 in paths
  # Every Dense / Conv of the tiny UNet (83) but conv_in, conv_out and the time MLP.
  assert len(paths) == 79
  assert ("conv_in",) not in paths and ("time_embedding", "linear_1") not in paths
  attn = lora_paths(params, ATTENTION_TARGETS)
  assert len(attn) == 4 * 2 * 4 and all(p[-1] in ("to_q", "to_k", "to_v", "to_out_0") for p in attn)

  lora = init_lora(jax.random.key(0), params, RANK)
  merged = merge(params, lora, 0.5)
  for k, v in traverse_util.flatten_dict(params).items():
    assert np.array_equal(np.asarray(traverse_util.flatten_dict(merged)[k]), v), k
  a = np.asarray(lora["down_blocks_1"]["resnets_0"]["conv1"]["lora_A"])
  assert a.shape == (3, 3, 8, RANK)
  assert not np.any(lora["down_blocks_1"]["resnets_0"]["conv1"]["lora_B"])
  # PEFT's kaiming-uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = 3*3*8.
  bound = 1 / np.sqrt(72)
  assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
  assert abs(a.std() - bound / np.sqrt(3)) < 0.15 * bound / np.sqrt(3)

  shapes = jax.eval_shape(lambda k: init_lora(k, _abstract(unet[0]), RANK), jax.random.key(0))
  assert jax.tree.map(lambda s: (s.shape, s.dtype), shapes) == \
      jax.tree.map(lambda v: (v.shape, v.dtype), lora)
  one_line_error(lambda: lora_paths(params, ("to_qq", "conv3")), "to_qq")
  one_line_error(lambda: init_lora(jax.random.key(0), params, 0), "rank")


def test_merge_math(unet):
  _, params, _, _, _ = unet
  rng = np.random.RandomState(2)
  lora = {"down_blocks_0": {"attentions_0": {"transformer_blocks_0": {"attn1": {"to_q": {
              "lora_A": rng.randn(8, 3).astype(np.float32),
              "lora_B": rng.randn(3, 8).astype(np.float32)}}}}},
          "down_blocks_1": {"resnets_0": {"conv1": {
              "lora_A": rng.randn(3, 3, 8, 3).astype(np.float32),
              "lora_B": rng.randn(3, 16).astype(np.float32)}}}}
  merged = merge(params, lora, 0.3)  # scale traced
  fp, fm, fl = (traverse_util.flatten_dict(t) for t in (params, merged, lora))
  dense = fp[TO_Q + ("kernel",)] + 0.3 * fl[TO_Q + ("lora_A",)] @ fl[TO_Q + ("lora_B",)]
  conv = fp[CONV1 + ("kernel",)] + 0.3 * np.einsum(
      "hwir,ro->hwio", fl[CONV1 + ("lora_A",)], fl[CONV1 + ("lora_B",)])
  np.testing.assert_allclose(fm[TO_Q + ("kernel",)], dense, atol=1e-5, rtol=0)
  np.testing.assert_allclose(fm[CONV1 + ("kernel",)], conv, atol=1e-5, rtol=0)
  assert np.abs(conv - fp[CONV1 + ("kernel",)]).max() > 0.1
  for k, v in fp.items():  # every other leaf untouched
    if k[:-1] not in (TO_Q, CONV1) or k[-1] != "kernel":
      assert np.array_equal(np.asarray(fm[k]), v), k
  # A bfloat16 base keeps its dtype.
  p16 = jax.tree.map(lambda v: jnp.asarray(v, jnp.bfloat16), params)
  assert traverse_util.flatten_dict(merge_lora(p16, lora, 0.3))[CONV1 + ("kernel",)].dtype == \
      jnp.bfloat16


@pytest.mark.parametrize("fmt", ["peft", "kohya", "peft_metadata"])
def test_parity_with_diffusers(unet, tiny_sd_folder, tmp_path, fmt):
  """diffusers' pipeline loads the file and runs PEFT's LoRA layers (unfused); the Flax UNet
  runs on merge_lora of the adapter the file was made from, and load_lora_file reads the
  file to the same merged weights."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from packaging.version import Version  # pylint: disable=g-import-not-at-top
  if fmt == "peft_metadata" and Version(diffusers.__version__) < Version("0.34"):
    pytest.skip("diffusers reads lora_adapter_metadata from 0.34 on (diffusers PR 11324)")
  _, params, apply, (x, t, ctx), base_out = unet
  lora = random_lora(params)
  # alpha 2 of rank 4 (scale 0.5) on most modules, 6 (1.5) on the resnets' conv1
  alphas = {n: 6.0 if n.endswith("conv1") else 2.0 for n in module_names(lora)}
  if fmt == "peft":
    file = save_lora_file(tmp_path, lora, 0.75)
    assert file == os.path.join(tmp_path, WEIGHT_NAME)
    merged = merge(params, lora, 0.75)
  else:
    merged = merge(params, scale_b(lora, alphas), 1.0)
    if fmt == "kohya":
      kohya_file(tmp_path / WEIGHT_NAME, lora, alphas)
    else:  # the LoraConfig diffusers >= 0.34 writes beside the tensors when given one
      config = {"unet.r": RANK, "unet.lora_alpha": 2.0, "unet.alpha_pattern": {"conv1": 6.0},
                "unet.target_modules": list(LCM_LORA_TARGETS)}
      save_file(peft_state_dict(lora), str(tmp_path / WEIGHT_NAME),
                metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)})
  out = np.asarray(apply(merged, x, t, ctx))
  flat_close(merge(params, *load_lora_file(tmp_path, params)), merged, 1e-6)

  pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_folder, safety_checker=None)
  pipe.load_lora_weights(str(tmp_path))
  with torch.no_grad():
    ref = pipe.unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                    torch.from_numpy(ctx)).sample.permute(0, 2, 3, 1).numpy()
  assert np.abs(ref - base_out).max() > 0.05  # the adapter changes the output
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_round_trip_and_kohya(unet, tmp_path):
  _, params, _, _, _ = unet
  lora = random_lora(params, seed=3)
  # PEFT file: the scale comes back folded into B.
  file = save_lora_file(tmp_path / "a.safetensors", lora, 0.75)
  assert not os.path.exists(file + ".tmp")
  back, scale = load_lora_file(file, params)
  assert scale == 1.0
  flat_close(merge(params, back, scale), merge(params, lora, 0.75), 1e-6)

  # kohya, one alpha != rank: the factors come back as they were, scale alpha / rank.
  names = module_names(lora)
  back, scale = load_lora_file(kohya_file(tmp_path / "k1.safetensors", lora,
                                          dict.fromkeys(names, 2.0)), params)
  assert scale == 0.5
  flat_close(back, lora, 0)

  # kohya, alphas per module: folded into B, and the same as the PEFT file of that adapter.
  alphas = {n: 1.0 + i % 3 for i, n in enumerate(names)}
  back, scale = load_lora_file(kohya_file(tmp_path / "k2.safetensors", lora, alphas), params)
  assert scale == 1.0
  peft_file = save_lora_file(tmp_path / "p2.safetensors", scale_b(lora, alphas))
  flat_close(merge(params, back, scale), merge(params, *load_lora_file(peft_file, params)),
             1e-6)
  flat_close(merge(params, back, scale), merge(params, scale_b(lora, alphas)), 1e-6)


def test_bad_files(unet, tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  _, params, _, _, _ = unet
  # Same module names, other widths.
  wide = UNet2DCondition.from_config(dict(sd_tiny.unet_kwargs(), block_out_channels=(16, 32)))
  file = save_lora_file(tmp_path / "wide", init_lora(jax.random.key(0), _abstract(wide), RANK))
  one_line_error(lambda: load_lora_file(file, params), "another architecture", "lora_A")
  # A module this network lacks (a third level).
  lora = {"down_blocks_2": {"resnets_0": {"conv1": {"lora_A": np.zeros((3, 3, 16, 2), np.float32),
                                                    "lora_B": np.zeros((2, 16), np.float32)}}}}
  file = save_lora_file(tmp_path / "deep.safetensors", lora)
  one_line_error(lambda: load_lora_file(file, params), "another architecture",
                 "unet.down_blocks.2.resnets.0.conv1.lora_A.weight")
  one_line_error(lambda: merge_lora(params, lora, 1.0), "another architecture")
  # Plain weights, and a file that is not safetensors at all.
  save_file(dict(list(state_dict_from_params(params).items())[:5]), str(tmp_path / "w.safetensors"))
  one_line_error(lambda: load_lora_file(tmp_path / "w.safetensors", params), "not a LoRA file")
  (tmp_path / "t.safetensors").write_text("not a tensor file")
  one_line_error(lambda: load_lora_file(tmp_path / "t.safetensors", params), "not a readable")
  with pytest.raises(FileNotFoundError):
    load_lora_file(tmp_path / "missing", params)
