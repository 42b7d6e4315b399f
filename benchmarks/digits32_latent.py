"""The digits32 latent teacher: DDIM with guidance, scored after decoding, on a CPU.

  python benchmarks/digits32_latent.py                  # train what is missing, then score
  python benchmarks/digits32_latent.py --guidance 0,2,5,8 --steps 50 --num 1000

Trains (or reuses, or resumes) configs/digits32_vae.py in <runs>/digits32_vae, caches its
latents of the digits (`cm_jax.cli.cache_latents`) in <runs>/digits32_latents, and trains
configs/digits32_ldm.py on the cache in <runs>/digits32_ldm. Then samples --num images per
guidance strength w (diffusers' guidance_scale = 1 + w) with DDIM at --steps, each image
prompted with its class's caption ("a handwritten digit seven"; the class drawn from the
image's seed), decodes them and scores them with the digits metric: the 32x32 images are
taken back to 8x8 by 4x4 block means and compared with the real digits passed through the
same 32 -> 8 path (so the data itself scores 0), FD-digits, class coverage and the
accuracy of the classifier's label against the prompt's digit. The autoencoder's own
reconstructions of all 1,797 digits are scored as the ceiling of the latent space.
Prints one table, also written as <out>.json and <out>.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "benchmarks")):
  if path not in sys.path:
    sys.path.insert(0, path)

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from digits_quality import sample_and_score, train_or_reuse, write_report  # noqa: E402
from cm_jax import runs  # noqa: E402
from cm_jax.cli import cache_latents  # noqa: E402
from cm_jax.data.captions import DigitsCaptionSource  # noqa: E402
from cm_jax.data.pipeline import to_model_range  # noqa: E402
from cm_jax.eval import digits_metric  # noqa: E402
from cm_jax.train import builders  # noqa: E402
from cm_jax.utils.images import to_uint8  # noqa: E402
from configs import digits32_ldm, digits32_vae  # noqa: E402
# pylint: enable=wrong-import-position


def real_digits(size: int):
  src = DigitsCaptionSource(size)
  items = [src[i] for i in range(len(src))]
  return np.stack([it["image"] for it in items]), np.asarray([it["label"] for it in items])


def reconstructions(parts, images: np.ndarray) -> np.ndarray:
  """uint8 decodes of the autoencoder's posterior means of `images` (the scaled latents
  the latent model trains on, decoded back)."""
  lp = parts.method.parts
  vae = jax.device_put(lp.params["vae"])
  fn = jax.jit(lambda x: lp.decode_latents(vae, lp.encode_images(vae, x)))
  out = [np.asarray(fn(jnp.asarray(to_model_range(images[s:s + 256]))))
         for s in range(0, len(images), 256)]
  return to_uint8(np.concatenate(out))


def markdown_table(rows) -> str:
  head = ["model", "sampler", "steps", "w", "NFE", "FD-digits", "coverage", "accuracy",
          "sample s"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    lines.append("| " + " | ".join([
        r["model"], r["sampler"], str(r["steps"]), str(r["w"]), str(r["nfe"]),
        f"{r['fd_digits']:.2f}", f"{r['coverage']:.2f}", f"{r['accuracy']:.3f}",
        f"{r['sample_s']:.1f}"]) + " |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--runs", default=os.path.join(ROOT, "runs"), help="run directories root")
  p.add_argument("--guidance", default="0,2,5,8", help="guidance strengths w")
  p.add_argument("--steps", type=int, default=50, help="DDIM steps")
  p.add_argument("--num", type=int, default=1000, help="samples per setting")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--variant", default="", choices=["", "tiny"], help="config variant")
  p.add_argument("--out", default=os.path.join(ROOT, "runs", "digits32_latent"))
  args = p.parse_args(argv)

  vae_dir = os.path.join(args.runs, "digits32_vae")
  cache_dir = os.path.join(args.runs, "digits32_latents")
  ldm_dir = os.path.join(args.runs, "digits32_ldm")
  vae_cfg = digits32_vae.get_config(args.variant)
  train_or_reuse(vae_cfg, vae_dir)
  config = digits32_ldm.get_config(args.variant)
  config.method.vae_workdir = vae_dir
  if not os.path.isfile(os.path.join(cache_dir, "cache.json")):
    cache_latents.build(config, cache_dir)  # resumes an interrupted cache
  config.data.update(name="latent_cache", path=cache_dir)
  train_s, _, _ = train_or_reuse(config, ldm_dir)

  parts = builders.build_parts(config)
  images, labels = real_digits(int(config.data.image_size))
  metric = digits_metric.DigitsMetric(reference=images)
  rows = []
  t0 = time.perf_counter()
  rec = metric(reconstructions(parts, images), labels)
  rows.append(dict(model="autoencoder reconstructions (1,797)", sampler="-", steps="-",
                   w="-", nfe="-", sample_s=time.perf_counter() - t0, **rec))
  params = runs.load_run(ldm_dir, config.sample.params).params
  for w in [float(v) for v in args.guidance.split(",")]:
    options = {"guidance": w} if w else {}
    scores, seconds = sample_and_score(metric, parts, params, config, None, num=args.num,
                                       seed=args.seed, num_steps=args.steps, **options)
    rows.append(dict(model="digits32 latent teacher", sampler="ddim", steps=args.steps,
                     w=w, nfe=args.steps * (2 if w else 1), sample_s=seconds, **scores))
    print(markdown_table(rows[-1:]).splitlines()[-1], flush=True)
  table = markdown_table(rows)
  print(table)
  write_report(args.out, {"rows": rows, "ldm_train_s": train_s}, metric,
               {"reference_images": "all 1,797 digits upscaled to 32 px, back to 8 px by 4x4 means",
                "num": args.num, "seed": args.seed, "steps": args.steps}, table + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
