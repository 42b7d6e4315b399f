"""Converts LPIPS-VGG weights from PyTorch files you downloaded into the .npz cm_jax reads.

  python -m cm_jax.nets.lpips_convert --vgg16 vgg16-397923af.pth --lin vgg.pth \
      --out lpips_vgg16.npz

Inputs (nothing is downloaded here):
* --vgg16: torchvision's ImageNet VGG16 state dict (`vgg16-397923af.pth`, the file
  `torchvision.models.vgg16(weights="IMAGENET1K_V1")` fetches); keys `features.{i}.weight`
  (O, I, 3, 3) and `features.{i}.bias` for the 13 convolutions i = 0, 2, 5, ..., 28.
* --lin: richzhang/PerceptualSimilarity's `lpips/weights/v0.1/vgg.pth`; keys
  `lin{l}.model.1.weight` (1, C, 1, 1), l = 0..4 (`lin{l}.model.0.weight` without dropout
  is accepted too), or piq's `lpips_weights.pt` (a list of five (1, C, 1, 1) tensors).

Output keys: `conv1_1/kernel` (3, 3, I, O) HWIO, `conv1_1/bias`, ..., `lin0/kernel`
(1, 1, C, 1); see `cm_jax.nets.lpips.param_shapes`. Needs `torch` only to read the files.
"""
from __future__ import annotations

import argparse
import re
import sys

import numpy as np

from cm_jax.nets import lpips
from cm_jax.utils import safe_load

# torchvision vgg16().features indices of the 13 convolutions, in order.
TORCHVISION_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def _np(t) -> np.ndarray:
  return np.asarray(t.detach().cpu().numpy() if hasattr(t, "detach") else t, np.float32)


def convert(vgg_state: dict, lin_state) -> dict:
  """Nested LPIPS params from a torchvision VGG16 state dict and the LPIPS lin weights."""
  names = [name for block in lpips.VGG16_BLOCKS for name, _ in block]
  params = {}
  for name, idx in zip(names, TORCHVISION_CONV_INDICES):
    try:
      w, b = vgg_state[f"features.{idx}.weight"], vgg_state[f"features.{idx}.bias"]
    except KeyError as e:
      raise ValueError(f"VGG16 state dict lacks {e}; expected torchvision's vgg16 keys "
                       "'features.{i}.weight'") from None
    params[name] = {"kernel": _np(w).transpose(2, 3, 1, 0), "bias": _np(b)}  # OIHW -> HWIO
  if isinstance(lin_state, (list, tuple)):
    lins = [_np(w) for w in lin_state]
  else:
    lins = []
    for i in range(len(lpips.TAP_CHANNELS)):
      keys = [k for k in lin_state if re.fullmatch(rf"lin{i}\.model\.\d+\.weight", k)]
      if len(keys) != 1:
        raise ValueError(f"LPIPS lin state dict: expected one 'lin{i}.model.*.weight', found {keys}")
      lins.append(_np(lin_state[keys[0]]))
  if len(lins) != len(lpips.TAP_CHANNELS):
    raise ValueError(f"expected {len(lpips.TAP_CHANNELS)} LPIPS lin weights, got {len(lins)}")
  for i, w in enumerate(lins):
    params[f"lin{i}"] = {"kernel": w.reshape(1, -1).T.reshape(1, 1, -1, 1)}  # (1,C,1,1) -> (1,1,C,1)
  for layer, leaves in lpips.param_shapes().items():
    for leaf, shape in leaves.items():
      if params[layer][leaf].shape != shape:
        raise ValueError(f"{layer}/{leaf}: got shape {params[layer][leaf].shape}, expected {shape}")
  return params


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--vgg16", required=True, help="torchvision VGG16 state dict (.pth)")
  parser.add_argument("--lin", required=True, help="PerceptualSimilarity v0.1 vgg.pth")
  parser.add_argument("--out", required=True, help="output .npz")
  args = parser.parse_args(argv)
  try:
    vgg_state = safe_load.load_torch(args.vgg16, "VGG16 .pth state dict")
    lin_state = safe_load.load_torch(args.lin, "LPIPS vgg.pth state dict")
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"lpips_convert: {e}")
  lpips.save_params(args.out, convert(vgg_state, lin_state))
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
