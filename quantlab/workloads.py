"""Built-in datasets and models, and the split every workload uses.

Datasets are plain numpy arrays (images as float32 in [0, 1], shape (N, H, W); labels int64), split
once with a fixed seed into train / calibration / test and cached as .npz so that a warm run needs
neither TensorFlow nor the network. Models are built with tf_keras (Keras 2), which
tensorflow-model-optimization can wrap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .config import ENGINE_VERSION, TrainSettings, content_hash, hash_bytes
from .errors import DatasetError

SPLIT_SEED = 1234
CALIBRATION_SIZE = 200
DIGITS_TEST_SIZE = 450


@dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset split into train, calibration (the representative set) and test."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_calib: np.ndarray
    y_calib: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    source: str
    # Several inputs: JSON list of [name, per-sample shape] in the order their values are packed
    # side by side in each x_* row (see uploads.pack_inputs); "" for one input.
    layout: str = ""

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_test.shape[1:])

    @property
    def has_labels(self) -> bool:
        """False for a dataset given without labels (y_test all -1): compared on fidelity only."""
        return bool(len(self.y_test)) and int(self.y_test.min()) >= 0

    @property
    def split_sizes(self) -> dict[str, int]:
        return {"train": len(self.x_train), "calibration": len(self.x_calib), "test": len(self.x_test)}

    @property
    def hash(self) -> str:
        """Content hash of every array: two datasets with equal data hash equally."""
        parts = [hash_bytes(np.ascontiguousarray(getattr(self, k)).tobytes()) for k in _ARRAY_KEYS]
        identity = {"arrays": parts, "shapes": [list(getattr(self, k).shape) for k in _ARRAY_KEYS]}
        if self.layout:
            identity["layout"] = self.layout
        return content_hash(identity)

    def save(self, path: Path) -> None:
        """Write the dataset as .npz atomically (a reader never sees half a file)."""
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, name=np.array(self.name), source=np.array(self.source),
                 num_classes=np.array(self.num_classes), layout=np.array(self.layout),
                 **{k: getattr(self, k) for k in _ARRAY_KEYS})
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "Dataset":
        with np.load(path, allow_pickle=False) as data:
            return cls(name=str(data["name"]), source=str(data["source"]),
                       num_classes=int(data["num_classes"]),
                       layout=str(data["layout"]) if "layout" in data else "",
                       **{k: data[k] for k in _ARRAY_KEYS})


_ARRAY_KEYS = ("x_train", "y_train", "x_calib", "y_calib", "x_test", "y_test")


@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    description: str
    needs_network: bool
    load: Callable[[], Dataset] = field(repr=False)


def split_dataset(name: str, source: str, x: np.ndarray, y: np.ndarray, *, test_size: int,
                  calibration_size: int = CALIBRATION_SIZE, num_classes: int | None = None) -> Dataset:
    """Split x, y with a fixed seed into train / calibration / test."""
    if len(x) < test_size + calibration_size + 10:
        raise DatasetError(f"{name} has only {len(x)} samples; a split needs more than "
                           f"{test_size + calibration_size + 10}: provide a larger dataset")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    test, calib, train = np.split(order, [test_size, test_size + calibration_size])
    return Dataset(
        name=name, source=source, num_classes=num_classes or int(y.max()) + 1,
        x_train=x[train], y_train=y[train], x_calib=x[calib], y_calib=y[calib],
        x_test=x[test], y_test=y[test],
    )


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of (N, H, W) images to (N, size, size), numpy only."""
    n, h, w = images.shape
    ys = (np.arange(size) + 0.5) * h / size - 0.5
    xs = (np.arange(size) + 0.5) * w / size - 0.5
    y0 = np.clip(np.floor(ys).astype(int), 0, h - 1)
    x0 = np.clip(np.floor(xs).astype(int), 0, w - 1)
    y1, x1 = np.clip(y0 + 1, 0, h - 1), np.clip(x0 + 1, 0, w - 1)
    wy = np.clip(ys - y0, 0, 1)[None, :, None]
    wx = np.clip(xs - x0, 0, 1)[None, None, :]
    top = images[:, y0][:, :, x0] * (1 - wx) + images[:, y0][:, :, x1] * wx
    bottom = images[:, y1][:, :, x0] * (1 - wx) + images[:, y1][:, :, x1] * wx
    return (top * (1 - wy) + bottom * wy).astype(np.float32)


def load_digits(size: int | None = None) -> Dataset:
    """scikit-learn's 1,797 real 8x8 handwritten digits (offline), optionally resized."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = (bunch.images / 16.0).astype(np.float32)
    name = "digits"
    if size:
        x, name = resize_images(x, size), f"digits-{size}"
    return split_dataset(name, "sklearn.datasets.load_digits", x, bunch.target.astype(np.int64),
                         test_size=DIGITS_TEST_SIZE, num_classes=10)


def load_keras_dataset(name: str) -> Dataset:
    """MNIST or Fashion-MNIST through the Keras loaders (downloads on first use; needs the internet)."""
    from .tfcompat import import_tensorflow

    _, tf_keras = import_tensorflow()
    loader = {"mnist": tf_keras.datasets.mnist, "fashion-mnist": tf_keras.datasets.fashion_mnist}[name]
    try:
        (x_train, y_train), (x_test, y_test) = loader.load_data()
    except Exception as exc:  # network errors come in many types
        raise DatasetError(f"could not download {name} ({type(exc).__name__}); "
                           f"connect to the internet or use the offline dataset digits-28") from None
    rng = np.random.default_rng(SPLIT_SEED)
    calib = rng.choice(len(x_train), CALIBRATION_SIZE, replace=False)
    train = np.setdiff1d(np.arange(len(x_train)), calib)
    scale = lambda a: (a / 255.0).astype(np.float32)  # noqa: E731
    return Dataset(name=name, source=f"tf_keras.datasets.{name.replace('-', '_')}", num_classes=10,
                   x_train=scale(x_train[train]), y_train=y_train[train].astype(np.int64),
                   x_calib=scale(x_train[calib]), y_calib=y_train[calib].astype(np.int64),
                   x_test=scale(x_test), y_test=y_test.astype(np.int64))


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    d.name: d for d in (
        BuiltinDataset("digits", "scikit-learn's 1,797 handwritten digits, 8x8 (offline)", False,
                       lambda: load_digits()),
        BuiltinDataset("digits-28", "the same digits resized to 28x28, the MNIST shape (offline)", False,
                       lambda: load_digits(28)),
        BuiltinDataset("mnist", "MNIST 28x28 via the Keras loader (needs the internet once)", True,
                       lambda: load_keras_dataset("mnist")),
        BuiltinDataset("fashion-mnist", "Fashion-MNIST 28x28 via the Keras loader (needs the internet once)",
                       True, lambda: load_keras_dataset("fashion-mnist")),
    )
}


def builtin_dataset_path(name: str, cache_dir: Path) -> Path:
    return cache_dir / "datasets" / f"{name}-e{ENGINE_VERSION}-s{SPLIT_SEED}.npz"


def load_builtin_dataset(name: str, cache_dir: Path) -> Dataset:
    """A built-in dataset, prepared once and then read from the cache."""
    if name not in BUILTIN_DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; use one of {', '.join(BUILTIN_DATASETS)} "
                           f"or a path to a .npz file")
    path = builtin_dataset_path(name, cache_dir)
    if path.exists():
        return Dataset.load(path)
    dataset = BUILTIN_DATASETS[name].load()
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save(path)
    return dataset


# --- models -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    build: Callable[[Any, tuple[int, ...], int], Any] = field(repr=False)


def _build_seed_cnn(keras: Any, input_shape: tuple[int, ...], num_classes: int) -> Any:
    """The tutorials' model: Reshape -> Conv2D(12, 3x3, relu) -> MaxPool 2x2 -> Flatten -> Dense."""
    h, w = input_shape[:2]
    return keras.Sequential([
        keras.layers.InputLayer(input_shape=input_shape, name="image"),
        keras.layers.Reshape((h, w, 1), name="reshape"),
        keras.layers.Conv2D(12, (3, 3), activation="relu", name="conv2d"),
        keras.layers.MaxPooling2D((2, 2), name="max_pooling2d"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(num_classes, name="dense"),
    ], name="seed_cnn")


def _build_mlp(keras: Any, input_shape: tuple[int, ...], num_classes: int) -> Any:
    return keras.Sequential([
        keras.layers.InputLayer(input_shape=input_shape, name="image"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(128, activation="relu", name="dense"),
        keras.layers.Dense(64, activation="relu", name="dense_1"),
        keras.layers.Dense(num_classes, name="logits"),
    ], name="mlp")


def _inverted_residual(keras: Any, x: Any, expansion: int, channels: int, stride: int, name: str) -> Any:
    layers = keras.layers
    in_channels = x.shape[-1]
    y = layers.Conv2D(in_channels * expansion, 1, use_bias=False, name=f"{name}_expand")(x)
    y = layers.BatchNormalization(momentum=0.9, name=f"{name}_expand_bn")(y)
    y = layers.ReLU(6.0, name=f"{name}_expand_relu")(y)
    y = layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False, name=f"{name}_dw")(y)
    y = layers.BatchNormalization(momentum=0.9, name=f"{name}_dw_bn")(y)
    y = layers.ReLU(6.0, name=f"{name}_dw_relu")(y)
    y = layers.Conv2D(channels, 1, use_bias=False, name=f"{name}_project")(y)
    y = layers.BatchNormalization(momentum=0.9, name=f"{name}_project_bn")(y)
    if stride == 1 and in_channels == channels:
        y = layers.Add(name=f"{name}_add")([x, y])
    return y


def _build_mobilenet(keras: Any, input_shape: tuple[int, ...], num_classes: int) -> Any:
    """A small MobileNetV2-family network: inverted residuals, depthwise convs, batch norm, ReLU6."""
    layers = keras.layers
    h, w = input_shape[:2]
    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Reshape((h, w, 1), name="reshape")(inputs)
    stem_stride = 2 if min(h, w) >= 16 else 1
    x = layers.Conv2D(16, 3, strides=stem_stride, padding="same", use_bias=False, name="stem")(x)
    x = layers.BatchNormalization(momentum=0.9, name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_relu")(x)
    blocks = ((1, 16, 1), (4, 24, 2), (4, 24, 1), (4, 32, 2), (4, 32, 1), (4, 48, 1))
    for i, (expansion, channels, stride) in enumerate(blocks):
        x = _inverted_residual(keras, x, expansion, channels, stride, name=f"block{i}")
    x = layers.Conv2D(128, 1, use_bias=False, name="head")(x)
    x = layers.BatchNormalization(momentum=0.9, name="head_bn")(x)
    x = layers.ReLU(6.0, name="head_relu")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="mobilenet")


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m for m in (
        BuiltinModel("seed-cnn", "the tutorials' CNN: Conv2D(12, 3x3) -> MaxPool -> Dense", _build_seed_cnn),
        BuiltinModel("mobilenet", "a small MobileNetV2-family network (inverted residuals, depthwise "
                                  "convs, batch norm, ReLU6), the family most sensitive to int8; on "
                                  "the easy built-in digits int8 measured within a point of float",
                     _build_mobilenet),
        BuiltinModel("mlp", "a 3-layer perceptron (128-64-classes)", _build_mlp),
    )
}


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int = 0) -> Any:
    """An untrained built-in tf_keras model for images of `input_shape` (H, W)."""
    from .errors import ModelError
    from .tfcompat import import_tensorflow

    if name not in BUILTIN_MODELS:
        raise ModelError(f"unknown model {name!r}; use one of {', '.join(BUILTIN_MODELS)} "
                         f"or a path to a .keras, .h5, SavedModel .zip or .tflite file")
    _, tf_keras = import_tensorflow()
    tf_keras.utils.set_random_seed(seed)
    return BUILTIN_MODELS[name].build(tf_keras, tuple(input_shape), num_classes)


def baseline_key(model: str, dataset_hash: str, train: TrainSettings) -> str:
    """Cache key of a trained built-in baseline."""
    return content_hash({"engine": ENGINE_VERSION, "model": model, "dataset": dataset_hash,
                         "train": train.to_dict()})


def train_baseline(name: str, dataset: Dataset, train: TrainSettings,
                   on_progress: Callable[[dict], None] | None = None) -> Any:
    """Train a built-in model on the train split with fixed seeds; returns the tf_keras model."""
    from .tfcompat import import_tensorflow

    tf, tf_keras = import_tensorflow()
    model = build_model(name, dataset.input_shape, dataset.num_classes, seed=train.seed)
    model.compile(optimizer=tf_keras.optimizers.Adam(train.learning_rate),
                  loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    callbacks = []
    if on_progress:
        class Progress(tf_keras.callbacks.Callback):
            def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
                on_progress({"stage": "train baseline", "epoch": epoch + 1, "epochs": train.epochs,
                             "loss": float((logs or {}).get("loss", float("nan")))})
        callbacks.append(Progress())
    model.fit(dataset.x_train, dataset.y_train, epochs=train.epochs, batch_size=train.batch_size,
              shuffle=True, verbose=0, callbacks=callbacks)
    return model
