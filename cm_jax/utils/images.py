"""Image conversions and the files users look at: PNG grids and `.npz` sample sets."""
from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np
from PIL import Image


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats -> uint8 in [0, 255], rounding like the FID reference code; uint8
  images pass through unchanged (the project's one conversion; cm_jax.data re-exports it)."""
  if getattr(images, "dtype", None) == np.uint8:
    return np.asarray(images)
  x = np.asarray(images, np.float32)
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, columns: Optional[int] = None, pad: int = 1) -> np.ndarray:
  """uint8 NHWC -> one HWC mosaic, nearly square, with `pad` black pixels between tiles."""
  n, h, w, c = images.shape
  columns = columns or int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / columns))
  grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, c), np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    y, x = pad + r * (h + pad), pad + col * (w + pad)
    grid[y:y + h, x:x + w] = image
  return grid


def save_grid_png(images: np.ndarray, path: str, min_size: int = 512) -> None:
  """Writes a PNG mosaic, enlarged with nearest-neighbour so small images stay visible."""
  grid = make_grid(images)
  scale = max(1, int(math.ceil(min_size / max(grid.shape[:2]))))
  if scale > 1:
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
  if grid.shape[2] == 1:
    grid = grid[:, :, 0]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(grid).save(path)


def save_samples_npz(path: str, images: np.ndarray, labels: Optional[np.ndarray] = None) -> None:
  """OpenAI's sample format: arr_0 = uint8 NHWC images, arr_1 = labels when conditional."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if labels is None:
    np.savez(path, images)
  else:
    np.savez(path, images, labels)
