"""Converts pytorch-fid's Inception weights (.pth) into the .npz cm_jax.eval.inception reads.

  python -m cm_jax.eval.inception_convert pt_inception-2015-12-05-6726825d.pth inception_fid.npz

The source is read with `torch.load(weights_only=True)` (tensors only, no code runs) and
must be the standard file: SHA-256 `inception.PYTORCH_FID_WEIGHTS_SHA256` (pass
--allow_nonstandard to convert another state dict with the same layout, e.g. a test's
random one; its FIDs are then not comparable with published numbers). The output records
the source's SHA-256; evaluate.py refuses non-standard weights unless told otherwise.
Get the source from https://github.com/mseitzer/pytorch-fid/releases (tag fid_weights),
or torch-fidelity's identical weights-inception-2015-12-05-6726825d.pth. Needs torch
(CPU is enough), only for this one-off conversion.
"""
from __future__ import annotations

import argparse
import hashlib
import sys

import numpy as np

from cm_jax.eval import inception
from cm_jax.utils import safe_load

_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(chunk), b""):
      h.update(block)
  return h.hexdigest()


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """A .pth state dict as numpy arrays, via torch's tensors-only unpickler."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("converting a .pth needs PyTorch (CPU build is enough): "
                      "pip install torch --index-url https://download.pytorch.org/whl/cpu") from e
  del torch  # only its presence is checked here; safe_load reads the file
  state = safe_load.load_torch(path, "Inception .pth state dict")
  if not isinstance(state, dict):
    raise ValueError(f"{path!r} holds a {type(state).__name__}, not a state dict")
  return {k: v.detach().cpu().numpy() for k, v in state.items() if hasattr(v, "detach")}


def convert_state_dict(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """torchvision/pytorch-fid names and layouts -> flat Flax names and layouts.

  'X.conv.weight' (O, I, kh, kw) -> 'X/conv/kernel' (kh, kw, I, O); 'X.bn.{weight, bias,
  running_mean, running_var}' -> 'X/bn/{scale, bias, mean, var}'; 'fc.weight' (1008, 2048)
  -> 'fc/kernel' (2048, 1008). num_batches_tracked and AuxLogits (absent from the FID
  file) are dropped.
  """
  flat = {}
  for key, value in state.items():
    parts = key.split(".")
    if parts[-1] == "num_batches_tracked" or parts[0] == "AuxLogits":
      continue
    value = np.asarray(value, np.float32)
    if parts[0] == "fc":
      flat[f"fc/{'kernel' if parts[1] == 'weight' else 'bias'}"] = (
          value.T if parts[1] == "weight" else value)
    elif parts[-2] == "conv" and parts[-1] == "weight":
      flat["/".join(parts[:-1] + ["kernel"])] = np.transpose(value, (2, 3, 1, 0))
    elif parts[-2] == "bn" and parts[-1] in _BN:
      flat["/".join(parts[:-1] + [_BN[parts[-1]]])] = value
    else:
      raise ValueError(f"unexpected entry {key!r} {value.shape} in the state dict")
  return flat


def convert(src: str, out: str, allow_nonstandard: bool = False) -> dict:
  source_sha = file_sha256(src)
  if source_sha != inception.PYTORCH_FID_WEIGHTS_SHA256 and not allow_nonstandard:
    raise ValueError(
        f"{src!r} has SHA-256 {source_sha}; the standard "
        f"{inception.PYTORCH_FID_WEIGHTS_NAME} has {inception.PYTORCH_FID_WEIGHTS_SHA256}. "
        "Use --allow_nonstandard to convert it anyway (FIDs will not match published ones).")
  flat = convert_state_dict(load_torch_state_dict(src))
  digest = inception.save_params(out, flat, source_sha)
  return {"source": src, "source_sha256": source_sha, "out": out, "params_sha256": digest,
          "standard": source_sha == inception.PYTORCH_FID_WEIGHTS_SHA256}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("src", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
  parser.add_argument("out", help="output .npz")
  parser.add_argument("--allow_nonstandard", action="store_true",
                      help="convert a state dict whose SHA-256 is not the standard file's")
  args = parser.parse_args(argv)
  try:
    info = convert(args.src, args.out, args.allow_nonstandard)
  except (ValueError, FileNotFoundError, ImportError) as e:
    print(f"inception_convert: {e}", file=sys.stderr)
    return 1
  print(f"wrote {info['out']} (source sha256 {info['source_sha256']}, "
        f"{'standard' if info['standard'] else 'NON-STANDARD'} weights; "
        f"params sha256 {info['params_sha256']})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
