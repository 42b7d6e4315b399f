"""The Flax CLIP text encoder (cm_jax.nets.clip_text) against transformers' PyTorch
CLIPTextModel on identical random weights, and the offline CLIP tokenizer utilities
(cm_jax.data.text_tokenizer) against transformers' CLIPTokenizer."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig
from transformers import CLIPTextModel as TorchCLIPTextModel

from cm_jax.data import text_tokenizer
from cm_jax.utils.torch_names import params_from_state_dict, state_dict_from_params
from cm_jax.nets.clip_text import (POSITION_IDS_KEY, CLIPTextModel, sd15_text_config,
                                   text_embeddings)

TOL = 1e-4
# The tiny text-encoder config of diffusers' Stable Diffusion pipeline tests.
TINY = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4,
            vocab_size=1000, bos_token_id=0, eos_token_id=2, pad_token_id=1,
            layer_norm_eps=1e-5)
# A current-style config: the end-of-text id is a real vocabulary id (pooled at its first
# occurrence, not at the row's largest id) and the MLP uses exact GELU.
NON_LEGACY = dict(TINY, eos_token_id=999, hidden_act="gelu")
LENGTH = 16


def _torch_reference(config: dict, seed: int):
  torch.manual_seed(seed)
  model = TorchCLIPTextModel(CLIPTextConfig(**config)).eval()
  with torch.no_grad():  # move every parameter off its init (LayerNorms off 1 / 0 too)
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
  # On disk (and in the Flax tree) the keys carry the `text_model.` prefix transformers 5
  # strips in memory; old checkpoints also store the position-id buffer.
  state = {f"text_model.{k}": v.numpy().copy() for k, v in model.state_dict().items()}
  state[POSITION_IDS_KEY[0]] = np.arange(77, dtype=np.int64)[None]
  return model, state


def _inputs(eos: int, pad: int, rng: np.random.Generator):
  """Three rows of 16 ids: bos, random words, eos, then padding (lengths 16, 9, 5), with the
  matching attention mask. With pad == eos the row holds eos several times."""
  ids = rng.integers(3, 998, size=(3, LENGTH))
  mask = np.zeros((3, LENGTH), np.int64)
  for row, n in enumerate((LENGTH, 9, 5)):
    ids[row, 0] = 0
    ids[row, n - 1] = eos
    ids[row, n:] = pad
    mask[row, :n] = 1
  return ids, mask


def _torch_outputs(model, ids, mask):
  with torch.no_grad():
    out = model(torch.from_numpy(ids), attention_mask=None if mask is None else
                torch.from_numpy(mask), output_hidden_states=True)
    skip1 = model.final_layer_norm(out.hidden_states[-2])  # diffusers' clip_skip=1
  return dict(last=out.last_hidden_state.numpy(), pooled=out.pooler_output.numpy(),
              hidden=[h.numpy() for h in out.hidden_states], skip1=skip1.numpy())


@pytest.fixture(scope="module", params=["legacy_quick_gelu", "eos_mid_gelu"])
def pair(request):
  """(Flax model, its params, jitted apply, torch model, torch state dict, ids, mask)."""
  config = TINY if request.param == "legacy_quick_gelu" else NON_LEGACY
  torch_model, state = _torch_reference(config, seed=0)
  net = CLIPTextModel.from_config(config)
  ids, mask = _inputs(config["eos_token_id"], 1 if config is TINY else 999,
                      np.random.default_rng(1))
  abstract = jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1, LENGTH), jnp.int32))
  params = params_from_state_dict(state, abstract["params"], what="clip text",
                                  ignore=POSITION_IDS_KEY)
  apply = jax.jit(lambda p, i, m: net.apply({"params": p}, i, m))
  return net, params, apply, torch_model, state, ids, mask


@pytest.mark.parametrize("masked", [False, True])
def test_parity_with_transformers(pair, masked):
  net, params, apply, torch_model, _, ids, mask = pair
  mask = mask if masked else None
  want = _torch_outputs(torch_model, ids, mask)
  got = apply(params, jnp.asarray(ids, jnp.int32), None if mask is None else jnp.asarray(mask))
  assert got.last_hidden_state.shape == (3, LENGTH, 32)
  assert len(got.hidden_states) == net.num_hidden_layers + 1 == len(want["hidden"])
  np.testing.assert_allclose(got.last_hidden_state, want["last"], rtol=0, atol=TOL)
  np.testing.assert_allclose(got.pooled_output, want["pooled"], rtol=0, atol=TOL)
  for g, w in zip(got.hidden_states, want["hidden"]):
    np.testing.assert_allclose(g, w, rtol=0, atol=TOL)
  np.testing.assert_allclose(text_embeddings(got, clip_skip=1), want["skip1"], rtol=0, atol=TOL)
  assert text_embeddings(got) is got.last_hidden_state
  # The mask changes the padded positions, so the masked case really tests the masking.
  if masked:
    free = _torch_outputs(torch_model, ids, None)["last"]
    assert np.abs(free[1, 9:] - want["last"][1, 9:]).max() > 1e-3


def test_pooling_position(pair):
  """Legacy configs (eos_token_id 2) pool at the row's largest id; others at the first eos."""
  net, params, apply, _, _, ids, _ = pair
  out = apply(params, jnp.asarray(ids, jnp.int32), None)
  if net.eos_token_id == 2:
    where = ids.argmax(-1)
  else:
    where = np.array([LENGTH - 1, 8, 4])  # first 999; the padding repeats it
  np.testing.assert_array_equal(
      out.pooled_output, np.asarray(out.last_hidden_state)[np.arange(3), where])


def test_state_dict_round_trip_exact(pair):
  _, params, _, _, state, _, _ = pair
  back = state_dict_from_params(params)
  want = {k: v for k, v in state.items() if k not in POSITION_IDS_KEY}
  assert sorted(back) == sorted(want)
  for k, v in want.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
    np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_remat_and_bfloat16(pair):
  """remat changes nothing numerically; bfloat16 compute stays close, with float32 LayerNorm
  statistics, and returns bfloat16 activations."""
  net, params, apply, _, _, ids, mask = pair
  ids, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask)
  ref = apply(params, ids, mask)
  remat = net.clone(remat=True).apply({"params": params}, ids, mask)
  # (not jitted, so XLA fuses differently: equal up to float32 rounding)
  np.testing.assert_allclose(remat.last_hidden_state, ref.last_hidden_state, rtol=0, atol=1e-5)
  half = net.clone(dtype=jnp.bfloat16).apply({"params": params}, ids, mask)
  assert half.last_hidden_state.dtype == jnp.bfloat16
  err = np.abs(np.asarray(half.last_hidden_state, np.float32) - ref.last_hidden_state).max()
  assert err < 0.25, err


def test_sd15_text_encoder_parameter_count():
  net = CLIPTextModel(**sd15_text_config())
  shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1, 77), jnp.int32))
  count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes["params"]))
  assert count == 123_060_480
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(shapes["params"]))


def test_from_config_reads_a_diffusers_text_encoder_config():
  config = dict(sd15_text_config(), _name_or_path="openai/clip-vit-large-patch14",
                architectures=["CLIPTextModel"], model_type="clip_text_model",
                torch_dtype="float32", dtype="float16", transformers_version="4.22.0.dev0",
                initializer_factor=1.0, initializer_range=0.02, attention_dropout=0.0,
                dropout=0.0)
  net = CLIPTextModel.from_config(config, dtype=jnp.bfloat16, remat=True)
  assert net.config_dict() == sd15_text_config()
  assert net.dtype == jnp.bfloat16 and net.remat


def test_unknown_activation_is_a_one_line_error():
  for make in (lambda: CLIPTextModel.from_config(dict(TINY, hidden_act="relu")),
               lambda: CLIPTextModel(**TINY, hidden_act="relu")):
    with pytest.raises(ValueError) as err:
      make()
    assert "relu" in str(err.value) and "\n" not in str(err.value)


def test_clip_skip_out_of_range(pair):
  _, params, apply, _, _, ids, _ = pair
  out = apply(params, jnp.asarray(ids, jnp.int32), None)
  with pytest.raises(ValueError, match="clip_skip"):
    text_embeddings(out, clip_skip=6)


# ---------------------------------------------------------------- tokenizer

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("clip_tokenizer"))
  text_tokenizer.write_word_level_tokenizer(["a", "handwritten", "digit"] + DIGITS, folder)
  return text_tokenizer.load_tokenizer(folder)


def test_word_level_tokenizer_ids(tokenizer, capsys):
  vocab = tokenizer.get_vocab()
  bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
  assert tokenizer.pad_token_id == eos  # SD 1.5 pads with <|endoftext|>
  assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (bos, eos)
  assert tokenizer.model_max_length == 77
  ids = text_tokenizer.tokenize(tokenizer, "a handwritten digit seven")
  assert ids.dtype == np.int32 and ids.shape == (1, 77)
  words = [vocab[w + "</w>"] for w in ("a", "handwritten", "digit", "seven")]
  assert ids[0].tolist() == [bos] + words + [eos] * 72
  # Every byte-level character is in the vocabulary, so unseen words still tokenize
  # (letter by letter) rather than to the unknown token; case and spacing are normalized.
  other = text_tokenizer.tokenize(tokenizer, ["A  Handwritten DIGIT nine!", "qz"])
  assert other[0, :6].tolist() == [bos] + words[:3] + [vocab["nine</w>"], vocab["!</w>"]]
  assert other[1, :4].tolist() == [bos, vocab["q"], vocab["z</w>"], eos]
  assert capsys.readouterr().err == ""


def test_tokenize_matches_the_pipeline_call(tokenizer):
  prompts = ["a handwritten digit zero", "nine eight", "", "a digit"]
  want = tokenizer(prompts, padding="max_length", max_length=77, truncation=True).input_ids
  np.testing.assert_array_equal(text_tokenizer.tokenize(tokenizer, prompts), np.array(want))


def test_truncation_warns_once_with_the_removed_text(tokenizer, capsys):
  words = " ".join(DIGITS * 8)  # 80 words: bos + 80 + eos = 82 tokens
  ids = text_tokenizer.tokenize(tokenizer, [words, "a digit"])
  vocab = tokenizer.get_vocab()
  assert ids.shape == (2, 77)
  assert ids[0, -1] == vocab["<|endoftext|>"]  # truncation keeps the end-of-text token
  assert ids[0, 1:76].tolist() == [vocab[w + "</w>"] for w in (DIGITS * 8)[:75]]
  err = capsys.readouterr().err
  assert err == ("warning: prompt truncated to 77 tokens: "
                 + " ".join((DIGITS * 8)[75:]) + "\n")
  want = tokenizer([words, "a digit"], padding="max_length", max_length=77,
                   truncation=True).input_ids
  np.testing.assert_array_equal(ids, np.array(want))


def test_load_tokenizer_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    text_tokenizer.load_tokenizer(str(tmp_path / "nowhere"))
  (tmp_path / "vocab.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="merges.txt") as err:
    text_tokenizer.load_tokenizer(str(tmp_path))
  assert "\n" not in str(err.value)


def test_word_level_tokenizer_rejects_split_words(tmp_path):
  with pytest.raises(ValueError, match="not one CLIP word"):
    text_tokenizer.write_word_level_tokenizer(["digit7"], str(tmp_path))


def test_builtin_digits_tokenizer():
  tok = text_tokenizer.builtin_tokenizer("digits")
  assert text_tokenizer.builtin_tokenizer("digits") is tok  # built once per process
  vocab = tok.get_vocab()
  captions = [f"a handwritten digit {w}" for w in DIGITS]
  ids = text_tokenizer.tokenize(tok, captions)
  assert ids.shape == (10, 77) and int(ids.max()) < len(tok)
  for row, w in zip(ids, DIGITS):
    assert row[:6].tolist() == [tok.bos_token_id] + [
        vocab[x + "</w>"] for x in ("a", "handwritten", "digit", w)] + [tok.eos_token_id]
    assert (row[6:] == tok.pad_token_id).all()
  with pytest.raises(ValueError, match="unknown name"):
    text_tokenizer.builtin_tokenizer("nope")
