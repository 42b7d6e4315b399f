"""CLIP's text transformer (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision", Sec. 2.4), the prompt encoder of Stable Diffusion.

Mirrors transformers' `CLIPTextModel` as diffusers pipelines store it in `text_encoder/`:
token + learned position embeddings, `num_hidden_layers` pre-LayerNorm transformer blocks
with causal self-attention and a quick_gelu (or gelu) MLP, and a final LayerNorm. The module
tree follows the torch attributes one to one, so a `text_encoder/model.safetensors` loads
through `cm_jax.utils.torch_names.params_from_state_dict` (pass
`ignore=POSITION_IDS_KEY`: old checkpoints also store the position-id buffer):

  torch key                                                 Flax parameter path
  text_model.embeddings.token_embedding.weight              text_model/embeddings/token_embedding/embedding
  text_model.embeddings.position_embedding.weight           text_model/embeddings/position_embedding/embedding
  text_model.encoder.layers.I.self_attn.{q,k,v,out}_proj.*  text_model/encoder/layers_I/self_attn/{q,k,v,out}_proj/*
  text_model.encoder.layers.I.layer_norm{1,2}.*             text_model/encoder/layers_I/layer_norm{1,2}/{scale,bias}
  text_model.encoder.layers.I.mlp.fc{1,2}.*                 text_model/encoder/layers_I/mlp/fc{1,2}/{kernel,bias}
  text_model.final_layer_norm.*                             text_model/final_layer_norm/{scale,bias}

(transformers 5 drops the `text_model.` prefix from its in-memory state dict and adds it
back when it saves; the files on disk have it, so the Flax tree does too.)

Parameters are float32; `dtype` is the compute dtype, with LayerNorm and the attention
softmax in float32 whatever it is.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

POSITION_IDS_KEY = ("text_model.embeddings.position_ids",)
_ACTIVATIONS = ("quick_gelu", "gelu")
# config.json keys that describe the checkpoint or training, not the network.
_BOOKKEEPING = frozenset({
    "_name_or_path", "architectures", "model_type", "torch_dtype", "dtype",
    "transformers_version", "initializer_factor", "initializer_range", "attention_dropout",
    "dropout"})


def quick_gelu(x: jax.Array) -> jax.Array:
  """x * sigmoid(1.702 x): the sigmoid approximation of GELU that OpenAI's CLIP was trained with."""
  return x * jax.nn.sigmoid(1.702 * x)


def _activation(name: str):
  if name == "quick_gelu":
    return quick_gelu
  # transformers' "gelu" is torch's exact (erf) GELU, not the tanh approximation.
  return lambda x: jax.nn.gelu(x, approximate=False)


def _check_activation(name: str) -> None:
  if name not in _ACTIVATIONS:
    raise ValueError(f"CLIPTextModel: hidden_act {name!r} is not supported "
                     f"(expected one of {', '.join(_ACTIVATIONS)})")


def layer_norm(x: jax.Array, eps: float, name: str) -> jax.Array:
  """LayerNorm computed in float32 whatever the compute dtype, cast back (fp16 LayerNorm
  statistics over 768+ channels lose too much precision)."""
  y = nn.LayerNorm(epsilon=eps, dtype=jnp.float32, name=name)(x.astype(jnp.float32))
  return y.astype(x.dtype)


@flax.struct.dataclass
class CLIPTextOutput:
  """What `CLIPTextModel.__call__` returns (a pytree, so it can leave a jit).

  last_hidden_state: (B, L, hidden) after the final LayerNorm (what SD conditions on).
  pooled_output:     (B, hidden) last_hidden_state at each row's end-of-text token.
  hidden_states:     num_hidden_layers + 1 arrays (B, L, hidden): the embeddings, then each
                     layer's output (the last one before the final LayerNorm), like
                     transformers' output_hidden_states=True.
  final_norm_scale, final_norm_bias: the final LayerNorm's parameters, so `text_embeddings`
                     can normalize an earlier layer the way diffusers' clip_skip does.
  layer_norm_eps:    that LayerNorm's epsilon.
  """
  last_hidden_state: jax.Array
  pooled_output: jax.Array
  hidden_states: tuple
  final_norm_scale: jax.Array
  final_norm_bias: jax.Array
  layer_norm_eps: float = flax.struct.field(pytree_node=False, default=1e-5)


def text_embeddings(outputs: CLIPTextOutput, clip_skip: int = 0) -> jax.Array:
  """The prompt embedding a Stable Diffusion UNet is conditioned on.

  clip_skip=0: last_hidden_state. clip_skip=k>0: the hidden state k layers before the last
  one, passed through the final LayerNorm (diffusers' StableDiffusionPipeline:
  `final_layer_norm(hidden_states[-(k + 1)])`).
  """
  if clip_skip == 0:
    return outputs.last_hidden_state
  n = len(outputs.hidden_states) - 1
  if not 0 < clip_skip < n + 1:
    raise ValueError(f"text_embeddings: clip_skip must be in [0, {n}], got {clip_skip}")
  h = outputs.hidden_states[-(clip_skip + 1)]
  params = {"params": {"scale": outputs.final_norm_scale, "bias": outputs.final_norm_bias}}
  y = nn.LayerNorm(epsilon=outputs.layer_norm_eps, dtype=jnp.float32).apply(
      params, h.astype(jnp.float32))
  return y.astype(h.dtype)


class CLIPAttention(nn.Module):
  """Multi-head self-attention with separate q/k/v projections (torch `CLIPAttention`)."""
  hidden_size: int
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    b, l, _ = x.shape
    head_dim = self.hidden_size // self.num_heads

    def heads(name):
      y = nn.Dense(self.hidden_size, dtype=self.dtype, name=name)(x)
      return y.reshape(b, l, self.num_heads, head_dim)

    q, k, v = heads("q_proj"), heads("k_proj"), heads("v_proj")
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits * (head_dim ** -0.5)
    # A finite fill (not -inf) like transformers: a fully masked row becomes uniform, not NaN.
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, l, self.hidden_size)
    return nn.Dense(self.hidden_size, dtype=self.dtype, name="out_proj")(out)


class CLIPMLP(nn.Module):
  hidden_size: int
  intermediate_size: int
  hidden_act: str = "quick_gelu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x)
    h = _activation(self.hidden_act)(h)
    return nn.Dense(self.hidden_size, dtype=self.dtype, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
  """Pre-LayerNorm block: x + attn(LN1(x)), then + mlp(LN2(.))."""
  hidden_size: int
  intermediate_size: int
  num_heads: int
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    h = layer_norm(x, self.layer_norm_eps, "layer_norm1")
    x = x + CLIPAttention(self.hidden_size, self.num_heads, self.dtype, name="self_attn")(h, mask)
    h = layer_norm(x, self.layer_norm_eps, "layer_norm2")
    return x + CLIPMLP(self.hidden_size, self.intermediate_size, self.hidden_act, self.dtype,
                       name="mlp")(h)


class CLIPEncoder(nn.Module):
  """The stack of layers (torch `CLIPEncoder.layers`); returns every layer's output."""
  num_layers: int
  hidden_size: int
  intermediate_size: int
  num_heads: int
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> list:
    layer_cls = nn.remat(CLIPEncoderLayer) if self.remat else CLIPEncoderLayer
    outputs = []
    for i in range(self.num_layers):
      x = layer_cls(self.hidden_size, self.intermediate_size, self.num_heads, self.hidden_act,
                    self.layer_norm_eps, self.dtype, name=f"layers_{i}")(x, mask)
      outputs.append(x)
    return outputs


class CLIPTextEmbeddings(nn.Module):
  vocab_size: int
  hidden_size: int
  max_position_embeddings: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    length = input_ids.shape[-1]
    if length > self.max_position_embeddings:
      raise ValueError(f"CLIPTextModel: sequence length {length} exceeds "
                       f"max_position_embeddings {self.max_position_embeddings}")
    init = nn.initializers.normal(0.02)  # transformers' initializer_range for CLIP text
    tokens = nn.Embed(self.vocab_size, self.hidden_size, dtype=self.dtype,
                      embedding_init=init, name="token_embedding")(input_ids)
    positions = nn.Embed(self.max_position_embeddings, self.hidden_size, dtype=self.dtype,
                         embedding_init=init, name="position_embedding")(jnp.arange(length))
    return tokens + positions[None]


class CLIPTextTransformer(nn.Module):
  """torch `CLIPTextTransformer` (the `text_model` attribute): embeddings, encoder, final LN."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  max_position_embeddings: int
  hidden_act: str
  layer_norm_eps: float
  eos_token_id: int
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array]) -> CLIPTextOutput:
    h = CLIPTextEmbeddings(self.vocab_size, self.hidden_size, self.max_position_embeddings,
                           self.dtype, name="embeddings")(input_ids)
    length = input_ids.shape[-1]
    # CLIP's text transformer is causal always; a padding mask additionally hides padded keys.
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if attention_mask is not None:
      mask = mask & (attention_mask.astype(bool)[:, None, None, :])
    layers = CLIPEncoder(self.num_hidden_layers, self.hidden_size, self.intermediate_size,
                         self.num_attention_heads, self.hidden_act, self.layer_norm_eps,
                         self.dtype, self.remat, name="encoder")(h, mask)
    final_norm = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=jnp.float32,
                              name="final_layer_norm")
    last = final_norm(layers[-1].astype(jnp.float32)).astype(h.dtype)

    rows = jnp.arange(input_ids.shape[0])
    if self.eos_token_id == 2:
      # Configs written before transformers PR #24773 carry eos_token_id=2 although the
      # real end-of-text id is the largest in CLIP's vocab; transformers keeps their
      # behaviour: pool at the largest id in the row.
      eos_position = jnp.argmax(input_ids, axis=-1)
    else:
      # The first end-of-text token (pad may equal eos, so not the last one).
      eos_position = jnp.argmax((input_ids == self.eos_token_id).astype(jnp.int32), axis=-1)
    norm_params = final_norm.variables["params"]
    return CLIPTextOutput(
        last_hidden_state=last, pooled_output=last[rows, eos_position],
        hidden_states=(h, *layers), final_norm_scale=norm_params["scale"],
        final_norm_bias=norm_params["bias"], layer_norm_eps=self.layer_norm_eps)


class CLIPTextModel(nn.Module):
  """transformers' `CLIPTextModel` in Flax; fields as in `CLIPTextConfig` (its defaults).

  `__call__(input_ids (B, L) int, attention_mask (B, L) with 1 = real token or None)` ->
  `CLIPTextOutput`. `projection_dim`, `bos_token_id` and `pad_token_id` are kept for the
  config round trip only; the text model itself does not use them.
  """
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 512
  eos_token_id: int = 49407
  bos_token_id: int = 49406
  pad_token_id: int = 1
  dtype: Any = jnp.float32
  remat: bool = False

  def __post_init__(self):
    _check_activation(self.hidden_act)
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"CLIPTextModel: hidden_size {self.hidden_size} is not divisible by "
                       f"num_attention_heads {self.num_attention_heads}")
    super().__post_init__()

  @classmethod
  def from_config(cls, config: Mapping[str, Any], *, dtype: Any = jnp.float32,
                  remat: bool = False) -> "CLIPTextModel":
    """From a transformers `text_encoder/config.json` dict. Bookkeeping keys (names,
    versions, dtypes, init and dropout settings) are ignored, and so is anything else that
    is not a field (transformers' generic config keys); the checkpoint's `torch_dtype` never
    sets the compute dtype, `dtype` does."""
    names = {f.name for f in dataclasses.fields(cls)} - {"dtype", "remat", "parent", "name"}
    kwargs = {k: v for k, v in config.items() if k in names and k not in _BOOKKEEPING}
    _check_activation(kwargs.get("hidden_act", "quick_gelu"))
    return cls(**kwargs, dtype=dtype, remat=remat)

  def config_dict(self) -> dict:
    """The CLIPTextConfig fields of this model (the inverse of `from_config`)."""
    names = [f.name for f in dataclasses.fields(self)
             if f.name not in ("dtype", "remat", "parent", "name")]
    return {n: getattr(self, n) for n in names}

  @nn.compact
  def __call__(self, input_ids: jax.Array,
               attention_mask: Optional[jax.Array] = None) -> CLIPTextOutput:
    return CLIPTextTransformer(
        self.vocab_size, self.hidden_size, self.intermediate_size, self.num_hidden_layers,
        self.num_attention_heads, self.max_position_embeddings, self.hidden_act,
        self.layer_norm_eps, self.eos_token_id, self.dtype, self.remat,
        name="text_model")(input_ids, attention_mask)


def sd15_text_config() -> dict:
  """Stable Diffusion 1.5's text encoder: OpenAI CLIP ViT-L/14's text tower (123,060,480
  parameters). The released config.json says bos 0 / eos 2 (the legacy ids, which pool at
  the largest id); with CLIP's real ids 49406 / 49407 the pooled position is the same for
  any tokenizer output, since 49407 is the largest id and the first one is the end token."""
  return dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
              layer_norm_eps=1e-5, projection_dim=768, bos_token_id=49406, eos_token_id=49407,
              pad_token_id=1)
