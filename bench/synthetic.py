"""Folders of synthetic JPEG photos for benchmarks: class sub-folders of smooth, textured images that compress
and decode like photos (not noise, which decodes several times slower than a photo of the same size).

python -m bench.synthetic --output=DIR --images=1000 [--width=500 --height=375] [--classes=10] [--json=FILE]

A folder that already holds what is asked for (its manifest says so) is reused, so a benchmark generates its data
once.
"""

import functools
import io
import json
import multiprocessing
import os

import numpy as np
from absl import flags
from PIL import Image

import bench

FLAGS = flags.FlagValues()
flags.DEFINE_string("output", None, "Folder to write (class sub-folders).", required=True, flag_values=FLAGS)
flags.DEFINE_integer("images", 1000, "Number of images.", flag_values=FLAGS)
flags.DEFINE_integer("width", 500, "Width in pixels.", flag_values=FLAGS)
flags.DEFINE_integer("height", 375, "Height in pixels.", flag_values=FLAGS)
flags.DEFINE_integer("classes", 10, "Number of class folders.", flag_values=FLAGS)
flags.DEFINE_string("json", "", "Also write what the folder holds (its manifest and path) to this JSON file.",
                    flag_values=FLAGS)

_MANIFEST = "synthetic.json"
# Stored with every photo, as phone cameras do (orientation 1: upright), so EXIF is parsed as for real photos.
_EXIF_UPRIGHT = (0x0112, 1)


def folder(root: str, images: int, width: int = 500, height: int = 375, classes: int = 10, quality: int = 90,
           seed: int = 0) -> str:
  """root/class_K/K_N.jpg for `images` images spread over `classes` folders; returns root."""
  wanted = {"images": images, "width": width, "height": height, "classes": classes, "quality": quality,
            "seed": seed}
  manifest = os.path.join(root, _MANIFEST)
  if os.path.exists(manifest):
    with open(manifest, encoding="utf-8") as f:
      if json.load(f) == wanted:
        return root
    raise FileExistsError(f"{root} holds other synthetic images; give another folder.")
  classes = min(classes, images)  # Every class folder holds images.
  for label in range(classes):
    os.makedirs(os.path.join(root, f"class_{label}"), exist_ok=True)
  jobs = [(root, index, index % classes, width, height, quality, seed) for index in range(images)]
  with multiprocessing.Pool(max(1, min(4, os.cpu_count() or 1))) as pool:
    pool.starmap(_write_photo, jobs, chunksize=64)
  with open(manifest, "w", encoding="utf-8") as f:
    json.dump(wanted, f)
  return root


def photo(index: int, label: int, width: int, height: int, seed: int = 0) -> np.ndarray:
  """uint8 [height, width, 3]: the class's colour under a smooth random pattern and a texture whose grain grows
  with the image, as a camera's detail does: at quality 90 about 70 KB at 500x375 and 2 MB at 4032x3024 (0.16
  bytes per pixel, as the phone photos in ../shared/datasets/sign_language_digits/train/7)."""
  rng = np.random.default_rng([seed, index])
  base = np.random.default_rng([seed, label, 7]).uniform(40, 215, 3)
  coarse = Image.fromarray(np.clip(base + rng.normal(0, 45, (24, 32, 3)), 0, 255).astype(np.uint8))
  coarse = np.asarray(coarse.resize((width, height), Image.BICUBIC), np.int16)
  tile = _texture_tile(seed, grain=max(2, width // 500))
  # The texture is a shifted tiling of one random tile: as costly to decode as fresh noise, much cheaper to make.
  shift = rng.integers(0, tile.shape[:2])
  reps = (-(-height // tile.shape[0]) + 1, -(-width // tile.shape[1]) + 1, 1)
  texture = np.tile(tile, reps)[shift[0]:shift[0] + height, shift[1]:shift[1] + width]
  return np.clip(coarse + texture, 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=None)
def _texture_tile(seed: int, grain: int, side: int = 512) -> np.ndarray:
  """int16 [side, side, 3] noise around 0, smooth over `grain` pixels."""
  noise = np.clip(128 + np.random.default_rng([seed, 1]).normal(0, 25, (side // grain, side // grain, 3)), 0, 255)
  return np.asarray(Image.fromarray(noise.astype(np.uint8)).resize((side, side), Image.BILINEAR), np.int16) - 128


def jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
  image = Image.fromarray(pixels)
  exif = image.getexif()
  exif[_EXIF_UPRIGHT[0]] = _EXIF_UPRIGHT[1]
  buffer = io.BytesIO()
  image.save(buffer, "JPEG", quality=quality, exif=exif.tobytes())
  return buffer.getvalue()


def _write_photo(root: str, index: int, label: int, width: int, height: int, quality: int, seed: int) -> None:
  path = os.path.join(root, f"class_{label}", f"{label}_{index}.jpg")
  with open(path, "wb") as f:
    f.write(jpeg(photo(index, label, width, height, seed), quality))


def main(argv: list[str]) -> dict:
  """Writes (or reuses) the folder, prints its path, writes --json; returns what it holds."""
  bench.parse_flags(FLAGS, argv, __doc__)
  root = folder(FLAGS.output, FLAGS.images, FLAGS.width, FLAGS.height, FLAGS.classes)
  with open(os.path.join(root, _MANIFEST), encoding="utf-8") as f:
    figures = {"folder": root, **json.load(f)}
  print(root)
  bench.write_figures(figures, FLAGS.json)
  return figures


if __name__ == "__main__":
  bench.run(main)
