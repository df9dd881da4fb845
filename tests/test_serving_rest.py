"""A TF Serving REST request body, turned into the signature's inputs the way TF Serving does, runs the export."""

import base64
import io
import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from trainer.input import images


@pytest.fixture(scope="module")
def signature(trained_workdir):
  return tf.saved_model.load(str(trained_workdir / "export" / "classifier" / "1")).signatures["serving_default"]


def _from_json(value):
  """TF Serving's JSON decoding: {"b64": "..."} is binary data; lists are tensor dimensions."""
  if isinstance(value, dict) and set(value) == {"b64"}:
    return base64.b64decode(value["b64"])
  if isinstance(value, dict):
    return {name: _from_json(item) for name, item in value.items()}
  if isinstance(value, list):
    return [_from_json(item) for item in value]
  return value


def rest_predict(signature, body: str) -> dict:
  """POST /v1/models/<name>:predict, in-process: the row ("instances") and columnar ("inputs") formats in, the
  row format out (one object of named outputs per instance), as TF Serving answers them."""
  request = json.loads(body)
  (input_name,) = signature.structured_input_signature[1]
  if "instances" in request:
    rows = [_from_json(instance) for instance in request["instances"]]
    value = [row[input_name] if isinstance(row, dict) else row for row in rows]
  else:
    columns = request["inputs"]
    value = _from_json(columns[input_name] if isinstance(columns, dict) else columns)
  outputs = {name: tensor.numpy() for name, tensor in signature(**{input_name: tf.constant(value)}).items()}

  def as_json(item):
    item = item.tolist() if isinstance(item, np.ndarray) else item.item() if isinstance(item, np.generic) else item
    if isinstance(item, list):
      return [as_json(i) for i in item]
    return item.decode() if isinstance(item, bytes) else item

  return {"predictions": [{name: as_json(values[i]) for name, values in outputs.items()}
                          for i in range(len(value))]}


def _jpeg(color) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.full((36, 48, 3), color, np.uint8)).save(buffer, format="JPEG")
  return buffer.getvalue()


@pytest.mark.parametrize("form", ["instances", "instances_named", "inputs"])
def test_rest_body_with_b64_images_gives_the_trained_models_answer(trained, signature, form):
  jpegs = [_jpeg((220, 40, 40)), _jpeg((40, 60, 220))]
  encoded = [{"b64": base64.b64encode(jpeg).decode("ascii")} for jpeg in jpegs]
  body = json.dumps({"instances": {"instances": encoded},
                     "instances_named": {"instances": [{"image_bytes": e} for e in encoded]},
                     "inputs": {"inputs": {"image_bytes": encoded}}}[form])

  response = rest_predict(signature, body)

  size = trained.config.data.image_size
  expected = trained.model(tf.stack([images.decode_and_resize(jpeg, size) for jpeg in jpegs]), training=False).numpy()
  predictions = json.loads(json.dumps(response))["predictions"]
  assert len(predictions) == 2
  for prediction, probabilities in zip(predictions, expected):
    assert np.max(np.abs(np.array(prediction["probabilities"]) - probabilities)) <= 1e-4
    assert prediction["classes"] == trained.classes[int(np.argmax(probabilities))]
    assert prediction["top_k_classes"][0] == prediction["classes"]
