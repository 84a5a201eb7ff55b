"""A network exported by `python main.py export`, run by onnxruntime with numpy alone (no torch): what
`python main.py serve --onnx model.onnx` answers with.

    model = OnnxModel("runs/X/model.onnx")
    model.probabilities(digits)       # digits prepared by digit_image (N, 28, 28) -> (N, 10), TTA if the run used it

The file carries what it needs beside the weights (export.py writes it): the run's config as JSON in the
model's metadata, from which `tta` is read, and its test accuracy.
"""
import json
import os

import numpy as np

from digit_image import TTA_SHIFTS
from errors import UserError


class OnnxError(UserError):
    """A file that is not a network this project exported (or not ONNX at all); the message names it."""


def tta_views(images):
    """(5N, 1, 28, 28): each image (N, 1, 28, 28) as it is and moved one pixel along TTA_SHIFTS, its edge pixels
    repeated into the gap, in the order the torch path averages them (model_train.log_probabilities)."""
    h, w = images.shape[-2:]
    padded = np.pad(images, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    return np.concatenate([padded[..., 1 - dy:1 - dy + h, 1 - dx:1 - dx + w] for dx, dy in TTA_SHIFTS])


def cpu_session(path, missing=""):
    """An onnxruntime session of the file on the CPU; OnnxError when there is no such file (`missing` says more)
    or it is not ONNX."""
    import onnxruntime
    if not os.path.isfile(path):
        raise OnnxError(f"{path}: no such file{missing}")
    try:
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # warnings about unused initializers are not the user's business
        return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own kinds: InvalidProtobuf, InvalidGraph, Fail, ...
        raise OnnxError(f"{path}: not an ONNX model onnxruntime can load ({type(e).__name__})") from None


class OnnxModel:
    """An exported network in an onnxruntime session on the CPU, its input checked when it is loaded."""

    def __init__(self, path):
        self.session = cpu_session(path)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1 or list(inputs[0].shape[1:]) != [1, 28, 28] \
                or inputs[0].type != "tensor(float)":
            shapes = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
            raise OnnxError(f"{path}: takes {shapes}, not one float batch (N, 1, 28, 28) of digits")
        self.input = inputs[0].name
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.config = json.loads(meta.get("config", "{}"))
        except ValueError:
            self.config = {}
        self.tta = bool(self.config.get("tta"))
        try:  # the confidence under which the network says "not a digit" (0: it never declines)
            self.threshold = float(meta.get("threshold", 0.0))
        except ValueError:
            self.threshold = 0.0
        self.path = path

    def log_probs(self, images):
        """The network's log-probabilities (N, 10) of normalised images (N, 1, 28, 28), single-view."""
        return self.session.run(None, {self.input: np.ascontiguousarray(images, dtype=np.float32)})[0]

    def probabilities(self, digits, tta=None):
        """The probabilities (N, 10) of digits prepared by digit_image (N, 28, 28); with TTA (the run's choice
        unless tta says), the softmax averaged over the image and its four one-pixel shifts."""
        images = np.asarray(digits, dtype=np.float32)[:, None]
        if not (self.tta if tta is None else tta):
            return np.exp(self.log_probs(images))
        probs = np.exp(self.log_probs(tta_views(images)))
        return probs.reshape(len(TTA_SHIFTS), len(images), -1).mean(0)


ROWS_FILE = "rows.onnx"  # the row reader's file, beside the digit network's (export.py writes it)


class OnnxRows:
    """An exported row reader (model.RowNet) in an onnxruntime session on the CPU: row_frames as
    digit_image.row_digits reads rows with."""

    def __init__(self, path):
        self.session = cpu_session(path, " (the row reader: `main.py export` writes it beside model.onnx)")
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or list(inputs[0].shape[1:3]) != [1, 32]:
            raise OnnxError(f"{path}: not a row reader (it takes no rows (N, 1, 32, W))")
        self.input, self.path = inputs[0].name, path

    def row_frames(self, row):
        """The frames (11, or 12 with a mark class, W / 2) of log-probabilities of one row (32, W)."""
        return self.session.run(None, {self.input: np.ascontiguousarray(row[None, None], dtype=np.float32)})[0][0]
