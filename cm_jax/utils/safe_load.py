"""Reading files users hand us (PyTorch checkpoints, .npz arrays) without running code from
them, with one-line errors for files that are damaged or not what they claim to be."""
from __future__ import annotations

import os

import numpy as np

_NPZ_MAGIC = b"PK"           # a .npz is a zip archive
_NPY_MAGIC = b"\x93NUMPY"


def _first_line(e: BaseException) -> str:
  text = (str(e).strip().splitlines() or [""])[0][:160]
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def torch_failure(e: BaseException, kind: str = "PyTorch file") -> str:
  """Why torch.load(weights_only=True) failed, in a few words. Never torch's own advice to
  retry with weights_only=False: that would run whatever code the file holds."""
  text = str(e)
  marker = "WeightsUnpickler error:"
  if marker in text:  # torch's restricted unpickler refused the stream
    detail = text.split(marker, 1)[1].strip().splitlines()[0]
    if detail.startswith("Unsupported global"):  # a class or function: code, not weights
      name = detail.split(":", 1)[1].split(" was not")[0].strip() if ":" in detail else ""
      return (f"it refers to {name or 'a Python object'}, not only tensors and plain "
              f"containers; such files are not loaded, since that would run their code")
    return f"damaged, or not a {kind}: {detail[:120]}"
  return f"damaged, or not a {kind}: {_first_line(e)}"


def load_torch(path: str, what: str = "PyTorch checkpoint"):
  """torch.load(path, weights_only=True) on the CPU; FileNotFoundError / ValueError in one
  line naming `path` and `what` it should have been."""
  import torch  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no {what} file at {path!r}")
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  (pickle, zip and torch errors alike)
    raise ValueError(f"{path!r} is not a readable {what} ({torch_failure(e)})") from None


def open_npz(path: str, what: str = ".npz file"):
  """np.load(path) of a .npz (no pickles) for use in a `with`; one-line FileNotFoundError /
  ValueError for a missing file, a file that is not a .npz, or a damaged archive."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no {what} at {path!r}")
  with open(path, "rb") as f:
    head = f.read(len(_NPY_MAGIC))
  if head.startswith(_NPY_MAGIC):
    raise ValueError(f"{path!r} is a single .npy array, not a {what} (np.savez writes those)")
  if not head.startswith(_NPZ_MAGIC):  # numpy would call it a pickle and suggest loading it
    raise ValueError(f"{path!r} is not a {what} (it is not a zip archive)")
  try:
    return np.load(path, allow_pickle=False)
  except Exception as e:  # pylint: disable=broad-except  (zipfile.BadZipFile, OSError, ...)
    raise ValueError(f"{path!r} is not a readable {what} ({_first_line(e)})") from None
