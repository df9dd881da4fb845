"""Registry of the ImageNet backbones users pick by name.

Each entry knows how to build the network without its top, its own `preprocess_input`, its native image size and
the named layer where fine-tuning starts by default, so that nobody counts layers by hand (`model.layers[:15]`).
"""

import dataclasses
import os
from typing import Callable

import keras

from trainer.errors import UserInputError


@dataclasses.dataclass(frozen=True)
class Backbone:
  name: str
  constructor: Callable[..., keras.Model]
  preprocess_input: Callable
  default_image_size: int
  # Where fine-tuning starts (the first layer of the last block, or stage): it unfreezes this layer and every one
  # above it.
  default_unfreeze_from: str
  has_alpha: bool = False


_APPS = keras.applications

REGISTRY: dict[str, Backbone] = {
    b.name: b for b in (
        Backbone("vgg16", _APPS.VGG16, _APPS.vgg16.preprocess_input, 224, "block5_conv1"),
        Backbone("resnet50", _APPS.ResNet50, _APPS.resnet50.preprocess_input, 224, "conv5_block3_1_conv"),
        # mixed8 has no weights; unfreezing from it trains the top two inception blocks (mixed9, mixed10),
        # the recipe of the Keras InceptionV3 fine-tuning example.
        Backbone("inception_v3", _APPS.InceptionV3, _APPS.inception_v3.preprocess_input, 299, "mixed8"),
        # 288, not the 224 it was trained at: the whole photo is resized without ImageNet's crop, so objects
        # come out smaller than the network learned them; a larger input restores their scale (the FixRes
        # effect). Measured on hymenoptera with frozen features: 0.940 at 224, 0.958 at 256, 0.962 at 288
        # (mean of 8 heads), for 1.65x the compute of 224. See BUILD_NOTES.md.
        # Fine-tuning from block_10 (blocks 10-16 and Conv_1), not the last block alone: with the fine-tune phase's
        # label smoothing of 0.1 it gained 1.2 points on sign_language_digits (not ImageNet-like) over 3 seeds and
        # held hymenoptera, for 1.08x the fine-tune phase's time of block_13, the earlier default. See
        # BUILD_NOTES.md (Defaults that generalise).
        Backbone("mobilenet_v2", _APPS.MobileNetV2, _APPS.mobilenet_v2.preprocess_input, 288, "block_10_expand",
                 has_alpha=True),
        Backbone("mobilenet", _APPS.MobileNet, _APPS.mobilenet.preprocess_input, 224, "conv_dw_13",
                 has_alpha=True),
        Backbone("efficientnet_b0", _APPS.EfficientNetB0, _APPS.efficientnet.preprocess_input, 224,
                 "block7a_expand_conv"),
    )
}


def get(name: str) -> Backbone:
  try:
    return REGISTRY[name]
  except KeyError:
    raise UserInputError(f"--backbone={name} is not known. Choose one of: {', '.join(sorted(REGISTRY))}.") from None


def build(name: str, weights: str, image_size: int, alpha: float = 1.0,
          weights_fallback: bool = False) -> keras.Model:
  """Builds the backbone without its top, named "backbone".

  weights: "imagenet" (Keras' download and cache), "none" (random init) or a path to a local .h5 file.
  """
  spec = get(name)
  kwargs = dict(include_top=False, input_shape=(image_size, image_size, 3), name="backbone")
  if spec.has_alpha:
    kwargs["alpha"] = alpha
  elif alpha != 1.0:
    raise UserInputError(f"--alpha={alpha} only applies to mobilenet and mobilenet_v2, not --backbone={name}.")

  if weights == "none":
    return spec.constructor(weights=None, **kwargs)
  if weights != "imagenet":
    if not os.path.isfile(weights):
      raise UserInputError(f"--weights={weights}: no such file. Pass imagenet, none, or the path of a Keras "
                           f"{name} .h5 weights file without top.")
    try:
      return spec.constructor(weights=weights, **kwargs)
    except (ValueError, OSError) as e:
      raise UserInputError(f"--weights={weights} does not fit --backbone={name} "
                           f"(alpha={alpha}, include_top=False): {e}") from None
  try:
    return spec.constructor(weights="imagenet", **kwargs)
  except Exception as e:  # Keras raises whatever the download layer raises (URLError, HTTPError, OSError, ...).
    message = (f"ImageNet weights for {name} could not be downloaded ({type(e).__name__}: {e}). "
               f"Download them where there is internet and pass --weights=PATH_TO_FILE.h5, or --weights=none.")
    if not weights_fallback:
      raise UserInputError(message) from None
    from absl import logging
    logging.warning("No ImageNet weights for %s (download failed: offline?): using random init, so expect "
                    "near-chance accuracy; pass --weights=PATH to a local .h5 for real transfer learning.", name)
    return spec.constructor(weights=None, **kwargs)

