import keras
import numpy as np
import pytest

from trainer.errors import UserInputError
from trainer.modeling import backbones

# The smallest input each architecture accepts, to build every entry quickly with random weights.
_MIN_SIZE = {"inception_v3": 75}


@pytest.mark.parametrize("name", sorted(backbones.REGISTRY))
def test_every_backbone_builds_and_knows_its_unfreeze_layer(name):
  spec = backbones.get(name)
  base = backbones.build(name, "none", _MIN_SIZE.get(name, 32))
  names = [layer.name for layer in base.layers]
  assert spec.default_unfreeze_from in names
  # The unfreeze point is in the top part of the network, never its stem.
  assert names.index(spec.default_unfreeze_from) > len(names) // 2
  assert base.name == "backbone"


def test_vgg16_fine_tunes_from_block5_conv1_as_the_tutorials_do():
  assert backbones.get("vgg16").default_unfreeze_from == "block5_conv1"


def test_local_weights_file_is_loaded(random_mobilenet_025_weights):
  loaded = backbones.build("mobilenet", random_mobilenet_025_weights, 32, alpha=0.25)
  random = backbones.build("mobilenet", "none", 32, alpha=0.25)
  kernel = lambda m: m.get_layer("conv1").get_weights()[0]
  assert not np.array_equal(kernel(loaded), kernel(random))
  reference = keras.applications.MobileNet(alpha=0.25, include_top=False, weights=random_mobilenet_025_weights,
                                           input_shape=(32, 32, 3))
  np.testing.assert_array_equal(kernel(loaded), kernel(reference))


def test_unknown_backbone_names_the_choices():
  with pytest.raises(UserInputError, match="mobilenet_v2"):
    backbones.get("mobilenet_v3")


def test_missing_weights_file_names_the_flag(tmp_path):
  with pytest.raises(UserInputError, match=r"--weights=.*no such file"):
    backbones.build("mobilenet", str(tmp_path / "missing.h5"), 32, alpha=0.25)


def test_weights_of_another_architecture_are_refused_with_the_flag(random_mobilenet_025_weights):
  with pytest.raises(UserInputError, match="does not fit --backbone=mobilenet_v2"):
    backbones.build("mobilenet_v2", random_mobilenet_025_weights, 32)


def test_imagenet_download_failure_says_how_to_pass_a_local_file(monkeypatch):
  def offline(*args, **kwargs):
    if kwargs.get("weights") == "imagenet":
      raise OSError("URL fetch failure: network unreachable")
    return keras.applications.MobileNet(*args, **kwargs)
  monkeypatch.setitem(backbones.REGISTRY, "mobilenet",
                      backbones.Backbone("mobilenet", offline, keras.applications.mobilenet.preprocess_input, 224,
                                         "conv_dw_13", has_alpha=True))
  with pytest.raises(UserInputError, match="--weights=PATH"):
    backbones.build("mobilenet", "imagenet", 32, alpha=0.25)
  fallback = backbones.build("mobilenet", "imagenet", 32, alpha=0.25, weights_fallback=True)
  assert fallback.name == "backbone"

