"""Encode a latent model's training data once with its frozen autoencoder.

  python -m cm_jax.cli.cache_latents --config configs/digits32_ldm.py \
      --out runs/digits32_latents [--config.method.vae_workdir=...]
  python train.py --config configs/digits32_ldm.py --workdir runs/digits32_ldm \
      --config.data.name=latent_cache --config.data.path=runs/digits32_latents

The autoencoder's encoder is the slow part of latent training (Rombach et al. 2022 train on
precomputed latents too): this reads `config.data` (captions tokenized once), encodes each
image to the scaled posterior mean z = scaling_factor * mean(E(x)) (the posterior noise,
std exp(logvar / 2), is dropped: a cached sample would freeze one draw anyway), and writes
npz shards with the token ids and labels beside the latents (`cm_jax.data.latent_cache`).
A progress bar shows the encoding; an interrupted run continues where it stopped when
rerun; a cache built from another autoencoder, resolution or data set is refused in one
line, and training on a cache checks that it was made with the run's autoencoder.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from ml_collections import config_flags

from cm_jax.cli.flag_errors import parse_flags_or_exit
from cm_jax.data import latent_cache, sources
from cm_jax.data.pipeline import to_model_range

def cache_meta(config, parts) -> dict:
  """What the cached latents depend on: checked when the cache is reused or trained on."""
  return {"frozen_weights": parts.identity, "scaling_factor": parts.scaling_factor,
          "posterior": "mean", "data": config.data.name,
          "num_classes": int(config.data.num_classes),
          "tokenizer": str(config.data.get("tokenizer", ""))}


def build(config, out_dir: str, batch_size: int = 64, shard_size: int = 1024,
          progress: bool = True) -> dict:
  """Caches `config.data` under `out_dir` with the config's frozen autoencoder."""
  # pylint: disable-next=g-import-not-at-top
  from cm_jax.train import builders
  method = builders.build_parts(config).method
  if not hasattr(method, "parts"):
    raise ValueError(f"latent caching needs a latent model's config (method ldm), not "
                     f"method {config.method.name!r}")
  parts = method.parts
  vae = jax.device_put(parts.params["vae"])
  encode = jax.jit(lambda images: parts.encode_images(vae, images))
  encode_fn = lambda uint8: encode(jnp.asarray(to_model_range(uint8)))
  return latent_cache.build_latent_cache(
      sources.make_source(config.data), encode_fn, out_dir, batch_size=batch_size,
      shard_size=shard_size, resolution=int(config.data.image_size),
      latent_shape_hint=method.network_input_shape(config), meta=cache_meta(config, parts),
      progress=progress)


def _define_flags():
  """The command line's flags, defined only when run as a program: `build` is also called
  from processes (tests, benchmarks) that define train.py's --config themselves."""
  return (config_flags.DEFINE_config_file("config", None, "a latent model's config (ldm)"),
          flags.DEFINE_string("out", None, "cache directory (created; rerun to resume)"),
          flags.DEFINE_integer("batch_size", 64, "images per encoder call"),
          flags.DEFINE_integer("shard_size", 1024, "images per shard file"))


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)
  config, out = _FLAGS[0].value, _FLAGS[1].value
  if config is None or not out:
    sys.exit("cache_latents: --config and --out are required")
  try:
    record = build(config, out, _FLAGS[2].value, _FLAGS[3].value)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"cache_latents: {e}")
  print(f"cached {record['count']} latents {tuple(record['latent_shape'])} in "
        f"{record['num_shards']} shard(s) under {out}; train with "
        f"--config.data.name=latent_cache --config.data.path={out}")


if __name__ == "__main__":
  _FLAGS = _define_flags()
  app.run(main, flags_parser=parse_flags_or_exit)
