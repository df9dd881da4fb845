"""A small procedurally drawn photo-like dataset for the offline demo: shapes whose class is visually obvious."""

import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("circles", "squares", "stripes", "triangles")


def draw(root: str, per_class: int = 80, size: int = 128, seed: int = 0) -> str:
  """Writes root/<class>/<i>.jpg (random colours, positions, sizes and backgrounds) and returns root."""
  rng = np.random.default_rng(seed)
  for name in CLASSES:
    os.makedirs(os.path.join(root, name), exist_ok=True)
    for index in range(per_class):
      _draw_one(name, size, rng).save(os.path.join(root, name, f"{name}_{index:03d}.jpg"), quality=90)
  return root


def _draw_one(name: str, size: int, rng: np.random.Generator) -> Image.Image:
  background = rng.integers(0, 256, 3)
  noise = rng.normal(0, 12, (size, size, 3))
  image = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(image)
  color = tuple(int(c) for c in (background + rng.integers(80, 176, 3)) % 256)
  radius = rng.uniform(0.18, 0.35) * size
  cx, cy = rng.uniform(radius, size - radius, 2)
  if name == "circles":
    draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=color)
  elif name == "squares":
    draw.rectangle([cx - radius, cy - radius, cx + radius, cy + radius], fill=color)
  elif name == "triangles":
    draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=color)
  else:
    period = int(rng.integers(size // 10, size // 5))
    for x in range(0, size, period):
      draw.rectangle([x, 0, x + period // 2, size], fill=color)
  return image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.2)))
