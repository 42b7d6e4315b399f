"""A small CNN on scikit-learn's 8x8 digits: the detector of the digits quality metric.

What Inception is to CIFAR-10, this is to the embedded digits data set: its penultimate
layer (64 GELU units, the input of the final linear layer, like Inception's pool_3) gives
the features of "FD-digits", and its softmax the class predictions for coverage and
label accuracy (cm_jax.eval.digits_metric).

The project trains it once, deterministically (fixed split, seed, steps and batch order;
a few seconds on a CPU), on 80% of the digits; the other 20% (360 images) are held out
and never seen. The weights are cached in `cache_dir()` under a name keyed by the SHA-256
of RECIPE, so changing the recipe retrains and old numbers are never silently mixed with
new ones. Every result records the recipe hash and the hash of the weights actually used
(float rounding can differ across machines, hence both).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cm_jax.utils.images import to_uint8
from cm_jax.utils.trees import flatten_paths, unflatten_paths

FEATURE_DIM = 64
NUM_CLASSES = 10
IMAGE_SIZE = 8

RECIPE = {
    "name": "cm_jax.eval.digits_classifier",
    "version": 1,
    "data": "sklearn load_digits; pixels v/8 - 1 as uint8 (the cm_jax digits pipeline); "
            "held out: the first 360 of np.random.default_rng(0).permutation(1797)",
    "holdout": 360,
    "split_seed": 0,
    "arch": {"convs": [16, 32, 64], "strides": [1, 2, 2], "hidden": FEATURE_DIM,
             "activation": "gelu"},
    "train": {"seed": 0, "steps": 600, "batch_size": 128, "optimizer": "adamw",
              "lr": 3e-3, "schedule": "cosine", "weight_decay": 1e-4,
              "augment": "random shift of -1..1 pixels in x and y, background fill"},
}


def recipe_sha256(recipe: dict = RECIPE) -> str:
  return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def cache_dir() -> str:
  """$CM_JAX_CACHE_DIR, else $XDG_CACHE_HOME/cm_jax, else ~/.cache/cm_jax."""
  if os.environ.get("CM_JAX_CACHE_DIR"):
    return os.environ["CM_JAX_CACHE_DIR"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "cm_jax")


# ----------------------------------------------------------------------------
# Data: the digits exactly as cm_jax.data serves them, as uint8.
# ----------------------------------------------------------------------------


def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
  """All 1,797 digits, uint8 (N, 8, 8, 1) as the cm_jax pipeline quantises them, and labels."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  d = load_digits()
  images = to_uint8(np.clip(d.images.astype(np.float32)[..., None] / 8.0 - 1.0, -1.0, 1.0))
  return images, d.target.astype(np.int32)


def digits_split(recipe: dict = RECIPE):
  """((train images, labels), (held-out images, labels)) of the classifier's recipe."""
  images, labels = digits_uint8()
  perm = np.random.default_rng(recipe["split_seed"]).permutation(len(images))
  hold, train = np.sort(perm[:recipe["holdout"]]), np.sort(perm[recipe["holdout"]:])
  return (images[train], labels[train]), (images[hold], labels[hold])


# ----------------------------------------------------------------------------
# The network.
# ----------------------------------------------------------------------------


class DigitsCNN(nn.Module):
  convs: tuple = (16, 32, 64)
  strides: tuple = (1, 2, 2)
  hidden: int = FEATURE_DIM

  @nn.compact
  def __call__(self, x):
    """x: float (B, 8, 8, 1) in [-1, 1] -> (features (B, hidden), logits (B, 10))."""
    for i, (c, s) in enumerate(zip(self.convs, self.strides)):
      x = nn.gelu(nn.Conv(c, (3, 3), strides=(s, s), padding="SAME", name=f"conv{i}")(x))
    x = x.reshape(x.shape[0], -1)
    features = nn.gelu(nn.Dense(self.hidden, name="hidden")(x))
    return features, nn.Dense(NUM_CLASSES, name="out")(features)


def _model(recipe: dict = RECIPE) -> DigitsCNN:
  a = recipe["arch"]
  return DigitsCNN(tuple(a["convs"]), tuple(a["strides"]), a["hidden"])


def to_input(images) -> jax.Array:
  """uint8 (B, 8, 8, 1|3) -> float32 in [-1, 1], grey."""
  x = jnp.asarray(images).astype(jnp.float32) / 127.5 - 1.0
  if x.shape[-1] == 3:
    x = jnp.mean(x, axis=-1, keepdims=True)
  return x


def to_digits_resolution(x: jax.Array) -> jax.Array:
  """(B, 8k, 8k, C) -> (B, 8, 8, C) by k x k block means: the inverse of the upscaling of
  the digits32 latent models' data (cm_jax.data.captions.DigitsCaptionSource), so their
  decoded samples are scored by the same 8x8 classifier as the pixel models."""
  size = x.shape[1]
  if x.shape[2] != size or size % IMAGE_SIZE:
    raise ValueError(f"the digits classifier reads square images whose side is a multiple "
                     f"of 8, got {tuple(x.shape)}")
  k = size // IMAGE_SIZE
  return x.reshape(x.shape[0], IMAGE_SIZE, k, IMAGE_SIZE, k, x.shape[-1]).mean(axis=(2, 4))


def detector_apply(params, images) -> dict:
  x = to_input(images)  # float [-1, 1], grey
  if tuple(x.shape[1:3]) != (IMAGE_SIZE, IMAGE_SIZE):
    x = to_digits_resolution(x)
  features, logits = _model().apply({"params": params}, x)
  return {"features": features, "logits": logits}


# ----------------------------------------------------------------------------
# Training (deterministic) and the cache.
# ----------------------------------------------------------------------------


def _shift_batch(x: jax.Array, shifts: jax.Array) -> jax.Array:
  """Moves each image by (dy, dx) in {-1, 0, 1}, filling with the background (-1)."""
  _, h, w, c = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
  crop = lambda img, d: jax.lax.dynamic_slice(img, (1 - d[0], 1 - d[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, shifts)


def train(recipe: dict = RECIPE, verbose: bool = False) -> tuple[dict, float]:
  """(params, held-out accuracy) from the recipe; same inputs, same batches every time."""
  t = recipe["train"]
  (x_train, y_train), (x_hold, y_hold) = digits_split(recipe)
  x_train = to_input(x_train)
  model = _model(recipe)
  params = jax.jit(model.init)(jax.random.key(t["seed"]), jnp.zeros((1, 8, 8, 1)))["params"]
  opt = optax.adamw(optax.cosine_decay_schedule(t["lr"], t["steps"]),
                    weight_decay=t["weight_decay"])
  opt_state = opt.init(params)
  # The batch order and shifts, drawn up front with numpy: identical on every machine.
  rng = np.random.default_rng(t["seed"])
  order = np.stack([rng.choice(len(y_train), t["batch_size"], replace=False)
                    for _ in range(t["steps"])])
  shifts = rng.integers(-1, 2, size=(t["steps"], t["batch_size"], 2))

  @jax.jit
  def step(params, opt_state, idx, shift):
    x, y = _shift_batch(x_train[idx], shift), jnp.asarray(y_train)[idx]

    def loss_fn(p):
      _, logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  # A Python loop over a jitted step: XLA:CPU runs convolutions inside lax.scan far slower.
  start = time.perf_counter()
  for i in range(t["steps"]):
    params, opt_state, loss = step(params, opt_state, order[i], shifts[i])
  params = jax.device_get(params)
  _, logits = model.apply({"params": params}, to_input(x_hold))
  accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == y_hold))
  if verbose:
    print(f"digits classifier: {t['steps']} steps in {time.perf_counter() - start:.1f}s, "
          f"final loss {float(loss):.4f}, held-out accuracy {accuracy:.4f}")
  return params, accuracy


def _flatten(params) -> dict[str, np.ndarray]:
  return {name: np.asarray(v, np.float32) for name, v in flatten_paths(params).items()}


def _digest(flat: dict) -> str:
  h = hashlib.sha256()
  for name in sorted(flat):
    h.update(name.encode())
    h.update(np.ascontiguousarray(flat[name]).tobytes())
  return h.hexdigest()


class DigitsClassifier:
  def __init__(self, params, holdout_accuracy: float, path: Optional[str]):
    self.params = params
    self.holdout_accuracy = holdout_accuracy
    self.path = path
    self.params_sha256 = _digest(_flatten(params))

  def fingerprint(self) -> dict:
    return {"name": "digits", "recipe_sha256": recipe_sha256(), "params_sha256":
            self.params_sha256, "holdout_accuracy": self.holdout_accuracy, "path": self.path}

  def __call__(self, images, batch_size: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images -> (features, logits) as numpy."""
    fn = jax.jit(detector_apply)
    feats, logits = [], []
    for s in range(0, len(images), batch_size):
      out = fn(self.params, np.asarray(images[s:s + batch_size]))
      feats.append(np.asarray(out["features"]))
      logits.append(np.asarray(out["logits"]))
    return np.concatenate(feats), np.concatenate(logits)


def cache_path(directory: Optional[str] = None) -> str:
  return os.path.join(directory or cache_dir(),
                      f"digits_classifier-{recipe_sha256()[:16]}.npz")


def load_or_train(cache_dir: Optional[str] = None, verbose: bool = False) -> DigitsClassifier:
  """The cached classifier for RECIPE, training and caching it first if needed."""
  path = cache_path(cache_dir)
  if os.path.exists(path):
    with np.load(path, allow_pickle=False) as f:
      if str(f["__recipe__"]) == json.dumps(RECIPE, sort_keys=True):
        flat = {k: f[k] for k in f.files if not k.startswith("__")}
        return DigitsClassifier(unflatten_paths(flat), float(f["__holdout_accuracy__"]), path)
  if verbose:
    print(f"training the digits classifier once (cached in {path})")
  params, accuracy = train(RECIPE, verbose=verbose)
  flat = _flatten(params)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  # Write then rename, so concurrent processes never read a half-written file.
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz")
  os.close(fd)
  np.savez(tmp, **flat, __recipe__=np.asarray(json.dumps(RECIPE, sort_keys=True)),
           __holdout_accuracy__=np.asarray(accuracy))
  os.replace(tmp, path)
  return DigitsClassifier(unflatten_paths(flat), accuracy, path)
