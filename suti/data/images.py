"""Reading user images: any PIL-readable file -> RGB uint8, centre-cropped and resized."""
from __future__ import annotations

import io
import pathlib

import numpy as np
import PIL.Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class UnreadableImageError(ValueError):
  """An image file could not be decoded; the message names the file."""


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
  """Grayscale, palette, RGBA, CMYK... -> RGB. Transparency is composited onto white."""
  if image.mode == "P" and "transparency" in image.info:
    image = image.convert("RGBA")  # palette transparency only survives through RGBA
  if image.mode in ("RGBA", "LA"):
    rgba = image.convert("RGBA")
    white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return PIL.Image.alpha_composite(white, rgba).convert("RGB")
  return image.convert("RGB")


def center_crop_resize(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
  """The largest centred square, resized to size x size (the DreamBench preprocessing)."""
  width, height = image.size
  side = min(width, height)
  left, top = (width - side) // 2, (height - side) // 2
  square = image.crop((left, top, left + side, top + side))
  return square.resize((size, size), PIL.Image.Resampling.BICUBIC, reducing_gap=3.0)


def load_image(path: str | pathlib.Path, size: int) -> np.ndarray:
  """Reads an image file as uint8 [size, size, 3]; raises UnreadableImageError naming it."""
  path = pathlib.Path(path)
  try:
    with PIL.Image.open(path) as image:
      image.load()  # decode now: a truncated file fails here, not later in the pipeline
      rgb = to_rgb(image)
  except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as e:
    raise UnreadableImageError(f"cannot read image {path}: {e}") from e
  if min(rgb.size) < 1:
    raise UnreadableImageError(f"cannot read image {path}: it has no pixels")
  return np.asarray(center_crop_resize(rgb, size), dtype=np.uint8)


def encode_png(array: np.ndarray) -> bytes:
  """uint8 [H, W, 3] or [H, W, 1] -> PNG bytes (TFDS stores images encoded; no TF needed)."""
  array = np.asarray(array)
  if array.dtype != np.uint8:
    raise ValueError(f"encode_png expects uint8, got {array.dtype}")
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  buffer = io.BytesIO()
  PIL.Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def save_png(array: np.ndarray, path: str | pathlib.Path) -> None:
  pathlib.Path(path).write_bytes(encode_png(array))


def pad_row(images, width: int, like=None) -> list[np.ndarray]:
  """A grid row: `images`, then white tiles (shaped like the first image, or `like`) up to
  `width` tiles."""
  images = list(images)
  blank = np.full_like(images[0] if images else like, 255)
  return images + [blank] * (width - len(images))


def image_grid(images: np.ndarray, columns: int, pad: int = 1, upscale: int = 1) -> np.ndarray:
  """uint8 [N, H, W, 3] -> one uint8 grid image, row-major, with white padding."""
  images = np.asarray(images)
  n, h, w, c = images.shape
  if upscale > 1:
    images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
    h, w = h * upscale, w * upscale
  rows = -(-n // columns)
  grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    top, left = pad + r * (h + pad), pad + col * (w + pad)
    grid[top:top + h, left:left + w] = image
  return grid
