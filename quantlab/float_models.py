"""The float model of a workload, run in its own framework: the baseline row and the reference outputs.

Runs in worker processes (imports TensorFlow). Three kinds, each measured where it was made:
a tf_keras model in tf_keras, a Keras 3 upload in Keras 3 (the file the user saved, not a rebuild),
and a SavedModel through its serving signature in TensorFlow.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import ModelError

PREDICT_BATCH = 256

LATENCY_METHODS = {
    "tf_keras": "tf_keras model called through tf.function at batch 1 (TensorFlow's own thread pools)",
    "keras3": "Keras 3 model (the uploaded file, loaded in Keras 3) called through tf.function at "
              "batch 1 (TensorFlow's own thread pools)",
    "savedmodel": "SavedModel serving signature called at batch 1 in TensorFlow (its own thread pools)",
}
LATENCY_SUFFIX = ", after warm-up runs; at least the same run count and duration as TFLite variants"


@dataclass(frozen=True)
class FloatModel:
    """A float model ready to predict and to be timed: `call` runs one batch and reads it back."""

    framework: str  # tf_keras | keras3 | savedmodel
    path: Path
    call: Callable[[np.ndarray], np.ndarray]
    input_dtype: str
    fixed_batch: int | None = None
    layers: tuple[str, ...] = ()
    call_all: Callable[[np.ndarray], list[np.ndarray]] | None = None  # every output, several outputs

    def predict_all(self, x: np.ndarray) -> list[np.ndarray]:
        """Every output (in the model's order) for packed samples x: a model with several outputs."""
        assert self.call_all is not None
        x = np.asarray(x).astype(self.input_dtype, copy=False)
        parts = [self.call_all(x[i:i + PREDICT_BATCH]) for i in range(0, len(x), PREDICT_BATCH)]
        return [np.concatenate([p[k] for p in parts]).astype(np.float32) for k in range(len(parts[0]))]

    @property
    def latency_method(self) -> str:
        return LATENCY_METHODS[self.framework] + LATENCY_SUFFIX

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Float32 outputs (N, ...) for samples x (N, ...), fed in the model input's dtype."""
        x = np.asarray(x).astype(self.input_dtype, copy=False)
        step = self.fixed_batch or PREDICT_BATCH
        parts = [self.call(x[i:i + step]) for i in range(0, len(x), step)]
        return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0,), np.float32)

    def sample(self, x: np.ndarray) -> np.ndarray:
        """One sample as a batch of one, in the input's dtype (for latency)."""
        return np.asarray(x[:1]).astype(self.input_dtype, copy=False)

    def artifact_bytes(self) -> tuple[int, int]:
        """(bytes, gzipped bytes) of the model as deployed: the file, or a SavedModel's files."""
        if self.path.is_dir():
            data = b"".join(p.read_bytes() for p in sorted(self.path.rglob("*")) if p.is_file())
        else:
            data = self.path.read_bytes()
        return len(data), len(gzip.compress(data, compresslevel=9, mtime=0))


def _tf() -> Any:
    from .tfcompat import import_tensorflow

    return import_tensorflow()[0]


def unpack_inputs(x: np.ndarray, inputs: list[dict]) -> list[np.ndarray]:
    """Packed rows (N, total) back into one array per input, each in its shape and dtype."""
    return [x[:, spec["offset"]:spec["offset"] + spec["size"]].reshape(len(x), *spec["shape"])
            .astype(spec["dtype"]) for spec in inputs]


def keras_float_model(model: Any, path: Path, framework: str, io: dict | None = None) -> FloatModel:
    """A tf_keras or Keras 3 model, called through tf.function (compiled once per input shape).

    `io` (several inputs or outputs, see uploads.model_io_plan): packed rows are unpacked per input,
    `call` returns the label output and `call_all` every output.
    """
    tf = _tf()
    fn = tf.function(lambda x: model(x, training=False))
    layers = tuple(f"{type(layer).__name__}:{layer.name}" for layer in model.layers)
    if not io:
        dtype = np.dtype(getattr(model.inputs[0].dtype, "as_numpy_dtype", model.inputs[0].dtype)).name

        def call(x: np.ndarray) -> np.ndarray:
            return np.asarray(fn(tf.constant(x)))

        return FloatModel(framework, path, call, dtype, layers=layers)
    inputs, names = io.get("inputs"), [o["name"] for o in io["outputs"]]
    label = names.index(io["label_output"])

    def call_all(x: np.ndarray) -> list[np.ndarray]:
        feed = [tf.constant(a) for a in unpack_inputs(x, inputs)] if inputs else tf.constant(x)
        return [np.asarray(o) for o in fn(feed)]

    dtype = "float32" if inputs else np.dtype(
        getattr(model.inputs[0].dtype, "as_numpy_dtype", model.inputs[0].dtype)).name
    return FloatModel(framework, path, lambda x: call_all(x)[label], dtype, layers=layers,
                      call_all=call_all)


def load_keras3(path: Path) -> Any:
    """A Keras 3 file QuantLab copied into its cache after the upload checks, loaded in Keras 3."""
    _tf()  # TF_USE_LEGACY_KERAS=1 first (it only changes what tf.keras means)
    import keras

    return keras.saving.load_model(str(path), compile=False, safe_mode=True)


def saved_model_float_model(path: Path) -> FloatModel:
    """A SavedModel's serving signature (one input, one output)."""
    tf = _tf()
    loaded = tf.saved_model.load(str(path))
    signature = loaded.signatures.get("serving_default")
    if signature is None:
        raise ModelError(f"{path.name} has no serving_default signature; export it with "
                         f"tf.saved_model.save(model, dir) or model.export(dir)")
    _, inputs = signature.structured_input_signature
    if len(inputs) != 1 or len(signature.structured_outputs) != 1:
        raise ModelError(f"{path.name}: the serving signature has {len(inputs)} inputs and "
                         f"{len(signature.structured_outputs)} outputs; QuantLab measures one of each")
    (name, spec), = inputs.items()
    (output_name,) = signature.structured_outputs
    batch = spec.shape[0] if spec.shape.rank else None

    def call(x: np.ndarray, _loaded: Any = loaded) -> np.ndarray:  # keeps the SavedModel alive
        return signature(**{name: tf.constant(x, dtype=spec.dtype)})[output_name].numpy()

    return FloatModel("savedmodel", path, call, spec.dtype.name, fixed_batch=batch,
                      layers=(f"signature input {name} {spec.dtype.name} {spec.shape}",))
