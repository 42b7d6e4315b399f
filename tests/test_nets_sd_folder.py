"""cm_jax.nets.sd_folder: a diffusers Stable Diffusion folder -> Flax params -> folder.

On the tiny random-weight pipeline of tests/sd_tiny.py: every Flax parameter equals its
torch tensor after the layout transform (checked here with an independent transcription of
the naming rule), a save gives back every safetensors tensor bit for bit and every JSON
byte for byte, diffusers loads the saved folder, and each broken folder is a one-line error
that leaves no directory half-written. No forward passes: the networks' own tests do parity.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import sd_tiny
from cm_jax.nets import sd_folder

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
VAE_FILE = "vae/diffusion_pytorch_model.safetensors"
TEXT_FILE = "text_encoder/model.safetensors"
WEIGHT_FILES = (UNET_FILE, VAE_FILE, TEXT_FILE)
JSON_FILES = ("model_index.json", "unet/config.json", "vae/config.json",
              "text_encoder/config.json", "scheduler/scheduler_config.json")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return sd_tiny.make_tiny_sd_folder(str(tmp_path_factory.mktemp("sd") / "tiny"))


@pytest.fixture(scope="module")
def loaded(tiny):
  return sd_folder.load_sd_folder(tiny)


@pytest.fixture(scope="module")
def exported(loaded, tmp_path_factory):
  return sd_folder.save_sd_folder(str(tmp_path_factory.mktemp("export") / "out"), loaded)


def _copy(tiny, tmp_path, name="copy"):
  dst = str(tmp_path / name)
  shutil.copytree(tiny, dst)
  return dst


def _one_line(excinfo) -> str:
  text = str(excinfo.value)
  assert "\n" not in text, text
  return text


def _flax_leaf(params, key: str, value: np.ndarray) -> np.ndarray:
  """The Flax array a torch tensor goes to, by the naming rule written out again here
  (numeric segments joined with '_'; weight -> kernel / scale / embedding)."""
  parts = []
  for p in key.split("."):
    if p.isdigit():
      parts[-1] += "_" + p
    else:
      parts.append(p)
  node = params
  for p in parts[:-1]:
    node = node[p]
  if parts[-1] == "weight":
    (leaf,) = [l for l in ("kernel", "scale", "embedding") if l in node]
  else:
    leaf = parts[-1]
  return np.asarray(node[leaf]), leaf


def _torch_to_flax(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)  # (O, I, kh, kw) -> (kh, kw, I, O)
  if leaf == "kernel":
    return value.T
  return value


def _n_leaves(tree) -> int:
  return sum(_n_leaves(v) for v in tree.values()) if isinstance(tree, dict) else 1


@pytest.mark.parametrize("component,file,prefix", [
    ("unet", UNET_FILE, ""), ("vae", VAE_FILE, ""), ("text_encoder", TEXT_FILE, "text_model.")])
def test_params_equal_torch_tensors(tiny, loaded, component, file, prefix):
  state = load_file(os.path.join(tiny, file))
  params = loaded.params(component)
  assert _n_leaves(params) == len(state)
  for key, value in state.items():
    # transformers 5 writes CLIP's keys without 'text_model.'; the Flax tree has that root.
    got, leaf = _flax_leaf(params, prefix + key, value)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, _torch_to_flax(leaf, value), err_msg=key)


def test_configs_and_modules(tiny, loaded):
  assert loaded.path == tiny
  assert loaded.model_index["_class_name"] == "StableDiffusionPipeline"
  assert loaded.unet_config["cross_attention_dim"] == 16
  assert loaded.vae_config["latent_channels"] == 4
  assert loaded.text_config["hidden_size"] == 16
  assert loaded.scheduler_config["_class_name"] == "DDIMScheduler"
  assert loaded.scheduler_config["steps_offset"] == 1
  assert loaded.tokenizer_dir == os.path.join(tiny, "tokenizer")
  assert loaded.text_key_prefix == "" and loaded.buffers == {}
  assert loaded.unet().cross_attention_dim == 16
  assert loaded.vae().latent_channels == 4
  assert loaded.text_encoder(dtype=np.float16).dtype == np.float16
  assert loaded.tokenizer()("a red cat").input_ids[1:4] == \
      [loaded.tokenizer().convert_tokens_to_ids(w + "</w>") for w in ("a", "red", "cat")]


def test_round_trip_is_bit_exact(tiny, exported):
  for rel in WEIGHT_FILES:
    a, b = load_file(os.path.join(tiny, rel)), load_file(os.path.join(exported, rel))
    assert sorted(a) == sorted(b), rel
    for key in a:
      assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
      assert a[key].tobytes() == b[key].tobytes(), key
    with safe_open(os.path.join(exported, rel), framework="numpy") as f:
      assert f.metadata() == {"format": "pt"}
  for rel in JSON_FILES:  # dicts equal, and even the bytes (same sorted, indented form)
    with open(os.path.join(tiny, rel), "rb") as fa, open(os.path.join(exported, rel), "rb") as fb:
      a, b = fa.read(), fb.read()
    assert json.loads(a) == json.loads(b), rel
    assert a == b, rel
  for name in os.listdir(os.path.join(tiny, "tokenizer")):
    with open(os.path.join(tiny, "tokenizer", name), "rb") as fa, \
        open(os.path.join(exported, "tokenizer", name), "rb") as fb:
      assert fa.read() == fb.read(), name
  parent = os.path.dirname(exported)
  assert os.listdir(parent) == ["out"]  # the temporary sibling was renamed, none is left


def test_diffusers_loads_the_export(tiny, exported):
  import torch
  from diffusers import DDIMScheduler, StableDiffusionPipeline
  pipe = StableDiffusionPipeline.from_pretrained(exported, safety_checker=None)
  assert isinstance(pipe.scheduler, DDIMScheduler)
  assert pipe.tokenizer("a red cat").input_ids[1:4] == \
      [pipe.tokenizer.convert_tokens_to_ids(w + "</w>") for w in ("a", "red", "cat")]
  for model, rel in ((pipe.unet, UNET_FILE), (pipe.vae, VAE_FILE),
                     (pipe.text_encoder, TEXT_FILE)):
    source = load_file(os.path.join(tiny, rel))
    state = {k: v for k, v in model.state_dict().items() if k in source}
    assert len(state) == len(source), rel
    for key, value in state.items():
      assert torch.equal(value, torch.from_numpy(source[key])), key


def test_lcm_folder_with_guidance_embedding(tmp_path):
  path = sd_tiny.make_tiny_sd_folder(str(tmp_path / "lcm"), time_cond_proj_dim=8,
                                     scheduler="lcm", seed=1)
  folder = sd_folder.load_sd_folder(path, components=("unet", "scheduler"))
  assert folder.scheduler_config["_class_name"] == "LCMScheduler"
  assert folder.unet().cond_dim == 8
  state = load_file(os.path.join(path, UNET_FILE))
  np.testing.assert_array_equal(
      np.asarray(folder.unet_params["time_embedding"]["cond_proj"]["kernel"]),
      state["time_embedding.cond_proj.weight"].T)
  assert folder.vae_params is None and folder.text_params is None
  # Components that were not loaded are copied from the source folder unchanged.
  out = sd_folder.save_sd_folder(str(tmp_path / "out"), folder)
  for rel in WEIGHT_FILES + JSON_FILES:
    with open(os.path.join(path, rel), "rb") as fa, open(os.path.join(out, rel), "rb") as fb:
      assert fa.read() == fb.read(), rel


def test_text_encoder_written_by_transformers_4(tiny, loaded, tmp_path):
  """'text_model.' keys and the position_ids buffer (older files) load, and save back."""
  path = _copy(tiny, tmp_path)
  state = {"text_model." + k: v for k, v in load_file(os.path.join(tiny, TEXT_FILE)).items()}
  state["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
  save_file(state, os.path.join(path, TEXT_FILE), metadata={"format": "pt"})
  folder = sd_folder.load_sd_folder(path, components=("text_encoder",))
  assert folder.text_key_prefix == "text_model."
  assert json.dumps(_tree_list(folder.text_params)) == json.dumps(_tree_list(loaded.text_params))
  out = sd_folder.save_sd_folder(str(tmp_path / "out"), folder)
  back = load_file(os.path.join(out, TEXT_FILE))
  assert sorted(back) == sorted(state)
  for key in state:
    assert back[key].dtype == state[key].dtype and back[key].tobytes() == state[key].tobytes()


def _tree_list(tree):
  if isinstance(tree, dict):
    return {k: _tree_list(v) for k, v in sorted(tree.items())}
  return np.asarray(tree).tolist()


def test_legacy_vae_attention_names(tiny, loaded, tmp_path):
  path = _copy(tiny, tmp_path)
  old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  state = {}
  for key, value in load_file(os.path.join(tiny, VAE_FILE)).items():
    for new, legacy in old.items():
      key = key.replace(f".attentions.0.{new}.", f".attentions.0.{legacy}.")
    state[key] = value
  assert any(".query." in k for k in state)
  save_file(state, os.path.join(path, VAE_FILE), metadata={"format": "pt"})
  folder = sd_folder.load_sd_folder(path, components=("vae",))
  assert _tree_list(folder.vae_params) == _tree_list(loaded.vae_params)


def test_sharded_and_fp16_weights(tiny, loaded, tmp_path):
  path = _copy(tiny, tmp_path)
  unet_dir = os.path.join(path, "unet")
  state = load_file(os.path.join(path, UNET_FILE))
  os.remove(os.path.join(path, UNET_FILE))
  keys = sorted(state)
  shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
            "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2]}
  for name, part in shards.items():
    save_file({k: state[k] for k in part}, os.path.join(unet_dir, name))
  with open(os.path.join(unet_dir, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}, f)
  folder = sd_folder.load_sd_folder(path, components=("unet",))
  assert _tree_list(folder.unet_params) == _tree_list(loaded.unet_params)

  # A folder with only the fp16 variant: read only when asked, as float32.
  half = {k: v.astype(np.float16) for k, v in state.items()}
  save_file(half, os.path.join(unet_dir, "diffusion_pytorch_model.fp16.safetensors"))
  for name in shards:
    os.remove(os.path.join(unet_dir, name))
  os.remove(os.path.join(unet_dir, "diffusion_pytorch_model.safetensors.index.json"))
  with pytest.raises(FileNotFoundError) as e:
    sd_folder.load_sd_folder(path, components=("unet",))
  assert "diffusion_pytorch_model.fp16.safetensors" in _one_line(e)  # says what is there
  assert "pass variant='fp16'" in str(e.value)
  folder = sd_folder.load_sd_folder(path, components=("unet",), variant="fp16")
  kernel = np.asarray(folder.unet_params["conv_in"]["kernel"])
  assert kernel.dtype == np.float32
  np.testing.assert_array_equal(
      kernel, half["conv_in.weight"].astype(np.float32).transpose(2, 3, 1, 0))


def test_missing_vae_subfolder(tiny, tmp_path):
  path = _copy(tiny, tmp_path)
  shutil.rmtree(os.path.join(path, "vae"))
  with pytest.raises(FileNotFoundError) as e:
    sd_folder.load_sd_folder(path)
  assert "vae/" in _one_line(e) and path in str(e.value)
  sd_folder.load_sd_folder(path, components=("unet", "text_encoder"))  # the rest is fine


def test_missing_folder_config_and_weights(tiny, tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    sd_folder.load_sd_folder(str(tmp_path / "nowhere"))
  assert "no Stable Diffusion folder" in _one_line(e)
  path = _copy(tiny, tmp_path)
  os.remove(os.path.join(path, "unet", "config.json"))
  with pytest.raises(FileNotFoundError) as e:
    sd_folder.load_sd_folder(path, components=("unet",))
  assert "unet config" in _one_line(e) and "config.json" in str(e.value)
  os.remove(os.path.join(path, TEXT_FILE))
  with pytest.raises(FileNotFoundError) as e:
    sd_folder.load_sd_folder(path, components=("text_encoder",))
  assert "model.safetensors" in _one_line(e)
  os.remove(os.path.join(path, "model_index.json"))
  with pytest.raises(FileNotFoundError) as e:
    sd_folder.load_sd_folder(path, components=("vae",))
  assert "model_index.json" in _one_line(e)


def test_unknown_class_name(tiny, tmp_path):
  path = _copy(tiny, tmp_path)
  config_path = os.path.join(path, "unet", "config.json")
  with open(config_path) as f:
    config = json.load(f)
  config["_class_name"] = "UNet2DModel"
  with open(config_path, "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError) as e:
    sd_folder.load_sd_folder(path, components=("unet",))
  assert "unknown unet class 'UNet2DModel'" in _one_line(e)
  sched_path = os.path.join(path, "scheduler", "scheduler_config.json")
  with open(sched_path, "w") as f:
    json.dump({"_class_name": "MyScheduler"}, f)
  with pytest.raises(ValueError) as e:
    sd_folder.load_sd_folder(path, components=("scheduler",))
  assert "unknown scheduler class 'MyScheduler'" in _one_line(e)


def test_missing_and_extra_tensor(tiny, tmp_path):
  path = _copy(tiny, tmp_path)
  state = load_file(os.path.join(tiny, UNET_FILE))
  key = "down_blocks.0.attentions.0.proj_out.weight"
  save_file({k: v for k, v in state.items() if k != key}, os.path.join(path, UNET_FILE))
  with pytest.raises(ValueError) as e:
    sd_folder.load_sd_folder(path, components=("unet",))
  assert _one_line(e).startswith("unet (")
  assert repr(key) in str(e.value) and "missing" in str(e.value)
  save_file(dict(state, **{"mid_block.extra.weight": np.zeros((2, 2), np.float32)}),
            os.path.join(path, UNET_FILE))
  with pytest.raises(ValueError) as e:
    sd_folder.load_sd_folder(path, components=("unet",))
  assert _one_line(e).startswith("unet (")
  assert "'mid_block.extra.weight' has no place" in str(e.value)
  state[key] = state[key][:, :4]
  save_file(state, os.path.join(path, UNET_FILE))
  with pytest.raises(ValueError) as e:
    sd_folder.load_sd_folder(path, components=("unet",))
  assert _one_line(e).startswith("unet (") and "shape" in str(e.value)


def test_pickle_only_unet(tiny, loaded, tmp_path):
  import torch
  path = _copy(tiny, tmp_path)
  state = load_file(os.path.join(path, UNET_FILE))
  os.remove(os.path.join(path, UNET_FILE))
  torch.save({k: torch.from_numpy(v) for k, v in state.items()},
             os.path.join(path, "unet", "diffusion_pytorch_model.bin"))
  with pytest.raises(ValueError) as e:
    sd_folder.load_sd_folder(path, components=("unet",))
  assert "holds only a PyTorch pickle (.bin)" in _one_line(e)
  assert "allow_pickle=True" in str(e.value)
  folder = sd_folder.load_sd_folder(path, components=("unet",), allow_pickle=True)
  assert _tree_list(folder.unet_params) == _tree_list(loaded.unet_params)


def test_existing_out_dir_is_refused(loaded, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError) as e:
    sd_folder.save_sd_folder(str(out), loaded)
  assert str(out) in _one_line(e)
  assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(out) == ["keep.txt"]
  empty = tmp_path / "empty"
  empty.mkdir()  # an empty directory is fine
  sd_folder.save_sd_folder(str(empty), loaded)
  assert "model_index.json" in os.listdir(empty)


def test_failed_save_leaves_nothing(loaded, tmp_path):
  """A save that fails half-way (here the text encoder, written after the unet and the
  vae, has no params and no source folder to copy it from) leaves no folder and no
  temporary sibling behind."""
  import dataclasses
  broken = dataclasses.replace(loaded, path=str(tmp_path / "gone"), text_params=None)
  with pytest.raises(ValueError) as e:
    sd_folder.save_sd_folder(str(tmp_path / "out"), broken)
  assert "the text_encoder was not loaded" in _one_line(e)
  assert os.listdir(tmp_path) == []
  # A failure inside the writer (a tensor that safetensors refuses) is cleaned up too.
  bad = dataclasses.replace(loaded, buffers={"vae": {"x.y": "not an array"}})
  with pytest.raises(Exception):
    sd_folder.save_sd_folder(str(tmp_path / "out"), bad)
  assert os.listdir(tmp_path) == []


def test_bfloat16_weights(tiny, tmp_path):
  """numpy has no bfloat16: such files are read as float32 exactly (bf16 is a float32's
  top half)."""
  import torch
  from safetensors.torch import save_file as save_torch
  path = _copy(tiny, tmp_path)
  state = {k: torch.from_numpy(v).to(torch.bfloat16)
           for k, v in load_file(os.path.join(tiny, VAE_FILE)).items()}
  save_torch(state, os.path.join(path, VAE_FILE), metadata={"format": "pt"})
  folder = sd_folder.load_sd_folder(path, components=("vae",))
  got = np.asarray(folder.vae_params["encoder"]["conv_in"]["kernel"])
  want = state["encoder.conv_in.weight"].float().numpy().transpose(2, 3, 1, 0)
  assert got.dtype == np.float32 and got.tobytes() == np.ascontiguousarray(want).tobytes()
