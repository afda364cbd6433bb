"""Validate and load user-supplied files without running anything they contain.

Every refusal is a `ModelError` or `DatasetError` whose message is one line naming the problem and
the fix. Nothing from an uploaded file executes on the server:

* Keras configs are walked *before* any deserialization (`check_model_config`): Lambda layers,
  custom classes, code references outside Keras and serialized bytecode are refused. This matters:
  tf_keras ignores `safe_mode` for `.h5` and SavedModel files, and its `.keras` loader imports any
  module a config names.
* SavedModels are read as protobufs first: Keras layer metadata is walked like a config, and the
  graph functions that loading or inference would run are scanned for ops that touch files or call
  Python (`WriteFile`, `ReadFile`, `PyFunc`, `PrintV2` to a file, ...). This op deny-list is a best
  effort, not a sandbox: run conversions and evaluations in a separate worker process as well.
* Archives are extracted member by member with name, type, count and size checks (declared sizes
  and bytes actually written); HDF5 files with external links or external/virtual datasets (which
  would read other files on the server) are refused.
* `.npz` datasets are loaded with `allow_pickle=False` after their `.npy` headers are checked.

What an upload becomes (`LoadedModel.kind`):

* ``"tf_keras"``: a tf_keras (Keras 2) model from `.h5`, `.keras` or a Keras SavedModel; every
  technique works on it.
* ``"keras3-savedmodel"``: a Keras 3 `.keras`/`.h5` file, loaded with Keras 3 (`safe_mode=True`,
  after the same config checks) and exported to a SavedModel. Post-training quantization works
  (`TFLiteConverter.from_saved_model(saved_model_dir)`); quantization-aware training, clustering and
  pruning do not, because tensorflow-model-optimization only wraps tf_keras models.
* ``"savedmodel"``: a plain TensorFlow SavedModel (no Keras metadata, or Keras metadata tf_keras
  cannot rebuild); post-training techniques only. Nothing in it is executed here: shapes come from
  its ``serving_default`` signature.

For the two SavedModel kinds there is no Keras model to evaluate: use the float32 `.tflite`
conversion of `saved_model_dir` as the baseline.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import re
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator

import numpy as np

from quantlab.errors import DatasetError, ModelError, QuantLabError

MB = 1024 * 1024

REUPLOAD_HINT = "rebuild the model from built-in tf_keras layers or upload a .tflite"
TRAINING_TECHNIQUES_HINT = "quantization-aware training, clustering and pruning"


# --------------------------------------------------------------------------------------------------
# Limits and small helpers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadLimits:
    """Caps applied to every upload (bytes on disk, archive members, bytes after unpacking)."""

    max_bytes: int = 200 * MB
    max_archive_files: int = 2000
    max_unpacked_bytes: int = 1024 * MB


DEFAULT_LIMITS = UploadLimits()


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _fail(error_cls: type[QuantLabError], message: str) -> QuantLabError:
    """The exception to raise: one line, whatever went into it."""
    return error_cls(_one_line(message))


_PATH_IN_TEXT = re.compile(r"(?:[A-Za-z]:)?[\\/](?:[^\s'\"\\/]+[\\/])+([^\s'\"\\/]+)")


def _short(exc: BaseException, limit: int = 160) -> str:
    """A library error squeezed into a clause: first line, server paths cut to file names."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = _PATH_IN_TEXT.sub(r"\1", _one_line(text))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _q(value: Any, limit: int = 80) -> str:
    """An uploaded name (member, class, module...) quoted for a message: one line, bounded."""
    text = _one_line(str(value))
    return "'" + (text if len(text) <= limit else text[: limit - 3] + "...") + "'"


def _user_errors(error_cls: type[QuantLabError]):
    """Turn any unexpected exception in a public entry point into a one-line `error_cls`.

    The original exception stays available as `__context__` for server logs.
    """

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except QuantLabError:
                raise
            except Exception as exc:
                first = args[0] if args else None
                name = Path(first).name if isinstance(first, (str, os.PathLike)) else "the upload"
                raise _fail(error_cls, f"{name} could not be checked ({type(exc).__name__}: "
                            f"{_short(exc)}); upload the file again or re-save it") from None

        return wrapper

    return decorate


def _human(num_bytes: float) -> str:
    if num_bytes >= MB:
        return f"{num_bytes / MB:.1f} MB"
    if num_bytes >= 1024:
        return f"{num_bytes / 1024:.1f} KB"
    return f"{int(num_bytes)} bytes"


@_user_errors(ModelError)
def check_file_size(path: str | os.PathLike, limits: UploadLimits = DEFAULT_LIMITS,
                    error_cls: type[QuantLabError] = ModelError) -> int:
    """Return a regular file's size; refuse missing files, symlinks and files over the cap."""
    path = Path(path)
    try:
        info = path.lstat()
    except OSError:
        raise _fail(error_cls, f"{path.name} was not found; upload the file again") from None
    if stat.S_ISLNK(info.st_mode):
        raise _fail(error_cls, f"{path.name} is a symbolic link; upload the file itself")
    if not stat.S_ISREG(info.st_mode):
        raise _fail(error_cls, f"{path.name} is not a regular file; upload a single file")
    if info.st_size > limits.max_bytes:
        raise _fail(error_cls, f"{path.name} is {_human(info.st_size)}, over the "
                    f"{_human(limits.max_bytes)} upload limit; upload a smaller file")
    if info.st_size == 0:
        raise _fail(error_cls, f"{path.name} is empty; upload the file again")
    return info.st_size


# --------------------------------------------------------------------------------------------------
# Archives
# --------------------------------------------------------------------------------------------------

_CHUNK = 1024 * 1024


def _safe_member_parts(name: str, source: str) -> tuple[str, ...]:
    """Path components of an archive member name, refusing anything that could leave the target."""
    if "\x00" in name:
        raise _fail(ModelError, f"{source} has a member name with a NUL byte; re-create the zip "
                    "with a standard tool")
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or re.match(r"^[A-Za-z]:", normalized):
        raise _fail(ModelError, f"{source} contains an absolute path {_q(name)}; re-create the zip "
                    "with paths relative to the model folder")
    parts = tuple(p for p in PurePosixPath(normalized).parts if p not in ("", "."))
    if ".." in parts:
        raise _fail(ModelError, f"{source} contains a path that escapes the folder ({_q(name)}); "
                    "re-create the zip with paths relative to the model folder")
    return parts


def _member_kind(info: zipfile.ZipInfo) -> str:
    """'dir', 'file' or the name of a forbidden special type, from the Unix mode bits."""
    mode = info.external_attr >> 16
    file_type = stat.S_IFMT(mode)
    if file_type == stat.S_IFLNK:
        return "symbolic link"
    if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "special file"
    if info.is_dir() or file_type == stat.S_IFDIR:
        return "dir"
    return "file"


def _check_zip_members(zf: zipfile.ZipFile, source: str,
                       limits: UploadLimits) -> list[tuple[zipfile.ZipInfo, tuple[str, ...], str]]:
    """Validate every member's name, type, count and declared size; return (info, parts, kind)."""
    infos = zf.infolist()
    files = [i for i in infos if not i.is_dir()]
    if len(files) > limits.max_archive_files:
        raise _fail(ModelError, f"{source} holds {len(files)} files, over the limit of "
                    f"{limits.max_archive_files}; upload only the model folder")
    checked = []
    seen: set[tuple[str, ...]] = set()
    declared_total = 0
    for info in infos:
        parts = _safe_member_parts(info.filename, source)
        kind = _member_kind(info)
        if kind in ("symbolic link", "special file"):
            raise _fail(ModelError, f"{source} contains a {kind} {_q(info.filename)}; "
                        "re-create the zip from regular files only")
        if info.flag_bits & 0x1:
            raise _fail(ModelError, f"{source} contains an encrypted member {_q(info.filename)}; "
                        "upload an unencrypted zip")
        if not parts:
            continue
        if kind == "file":
            if parts in seen:
                raise _fail(ModelError, f"{source} lists {_q(info.filename)} twice; re-create the "
                            "zip with a standard tool")
            seen.add(parts)
            declared_total += info.file_size
            if declared_total > limits.max_unpacked_bytes:
                raise _fail(ModelError, f"{source} would unpack to more than "
                            f"{_human(limits.max_unpacked_bytes)}; upload a smaller model")
        checked.append((info, parts, kind))
    return checked


def _open_zip(path: Path, source: str, limits: UploadLimits) -> zipfile.ZipFile:
    check_file_size(path, limits, ModelError)
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise _fail(ModelError, f"{source} is not a valid zip archive (corrupt, truncated or "
                    "another format); upload the archive again or re-create it") from None
    except (OSError, ValueError, EOFError) as exc:
        raise _fail(ModelError, f"{source} could not be read as a zip archive ({_short(exc)}); "
                    "upload the archive again") from None


def _clear_directory(dest: Path, created: bool) -> None:
    if created:
        shutil.rmtree(dest, ignore_errors=True)
        return
    for child in list(dest.iterdir()):
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _extract_zip(zip_path: str | os.PathLike, dest_dir: str | os.PathLike,
                 limits: UploadLimits = DEFAULT_LIMITS) -> Path:
    """Extract every member of a checked zip into an empty `dest_dir`; clean up on any refusal."""
    zip_path, dest = Path(zip_path), Path(dest_dir)
    source = zip_path.name
    created = not dest.exists()
    if not created and (not dest.is_dir() or any(dest.iterdir())):
        raise _fail(ModelError, f"cannot extract {source}: the target folder {dest.name} is not "
                    "empty; extract into a new folder")
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    try:
        with _open_zip(zip_path, source, limits) as zf:
            members = _check_zip_members(zf, source, limits)
            written = 0
            for info, parts, kind in members:
                target = root.joinpath(*parts)
                if root not in target.resolve().parents and target.resolve() != root:
                    raise _fail(ModelError, f"{source} contains a path that escapes the folder "
                                f"({_q(info.filename)}); re-create the zip with relative paths")
                if kind == "dir":
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                member_bytes = 0
                with zf.open(info) as src, open(target, "xb") as out:
                    while chunk := src.read(_CHUNK):
                        member_bytes += len(chunk)
                        written += len(chunk)
                        if member_bytes > info.file_size:
                            raise _fail(ModelError, f"{source} member {_q(info.filename)} is "
                                        "larger than its header says (a zip bomb or a "
                                        "corrupt archive); re-create the zip with a standard "
                                        "tool")
                        if written > limits.max_unpacked_bytes:
                            raise _fail(ModelError, f"{source} unpacks to more than "
                                        f"{_human(limits.max_unpacked_bytes)}; upload a smaller "
                                        "model")
                        out.write(chunk)
        return dest
    except QuantLabError:
        _clear_directory(dest, created)
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError,
            NotImplementedError, RuntimeError) as exc:
        _clear_directory(dest, created)
        raise _fail(ModelError, f"{source} could not be extracted ({_short(exc)}); upload the "
                    "archive again or re-create it") from None
    except BaseException:
        _clear_directory(dest, created)
        raise


def _saved_model_roots(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("saved_model.pb")
                  if "__MACOSX" not in p.parts and p.is_file() and not p.is_symlink())


@_user_errors(ModelError)
def extract_zip_safely(zip_path: str | os.PathLike, dest_dir: str | os.PathLike,
                       limits: UploadLimits = DEFAULT_LIMITS) -> Path:
    """Extract a zipped SavedModel into `dest_dir` (empty or absent) and return the SavedModel root.

    Refuses absolute paths, `..` escapes, symlinks and special files, encrypted members, more than
    `limits.max_archive_files` files, more than `limits.max_unpacked_bytes` declared *or* actually
    written, corrupt archives, and archives without exactly one `saved_model.pb`. Nothing is left in
    `dest_dir` after a refusal.
    """
    dest = Path(dest_dir)
    created = not dest.exists()
    _extract_zip(zip_path, dest, limits)
    roots = _saved_model_roots(dest)
    if len(roots) != 1:
        _clear_directory(dest, created)
        if not roots:
            raise _fail(ModelError, f"{Path(zip_path).name} contains no saved_model.pb; zip the "
                        "folder written by model.save(...) / tf.saved_model.save(...)")
        raise _fail(ModelError, f"{Path(zip_path).name} contains {len(roots)} SavedModels; zip "
                    "exactly one SavedModel folder")
    return roots[0]


def _check_directory_tree(root: Path, source: str, limits: UploadLimits) -> None:
    """A SavedModel folder given directly: no symlinks or special files, within the caps."""
    count = 0
    total = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            entry = Path(dirpath) / name
            mode = entry.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise _fail(ModelError, f"{source} contains a symbolic link {_q(name)}; upload a "
                            "folder of regular files")
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise _fail(ModelError, f"{source} contains a special file {_q(name)}; upload a "
                            "folder of regular files")
            if stat.S_ISREG(mode):
                count += 1
                total += entry.lstat().st_size
        if count > limits.max_archive_files or total > limits.max_unpacked_bytes:
            raise _fail(ModelError, f"{source} is larger than the upload limits "
                        f"({limits.max_archive_files} files, {_human(limits.max_unpacked_bytes)}); "
                        "upload only the model folder")


# --------------------------------------------------------------------------------------------------
# Keras configs
# --------------------------------------------------------------------------------------------------

MODEL_CLASSES = frozenset({"Sequential", "Functional", "Model"})

# Built-in layers that only hold tensors and numbers in their configs. Left out on purpose: Lambda
# (Python bytecode), TFSMLayer (loads a SavedModel from a server path), TorchModuleWrapper (pickle),
# JaxLayer/FlaxLayer (Python callables), StringLookup/IntegerLookup/TextVectorization (vocabulary
# file paths), DenseFeatures (feature columns), abstract bases (Layer, Wrapper, AbstractRNNCell).
LAYER_CLASSES = frozenset({
    # core
    "InputLayer", "Dense", "EinsumDense", "Activation", "Embedding", "Masking", "Identity",
    # convolution
    "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
    "Convolution1D", "Convolution2D", "Convolution3D", "Convolution1DTranspose",
    "Convolution2DTranspose", "Convolution3DTranspose", "DepthwiseConv1D", "DepthwiseConv2D",
    "SeparableConv1D", "SeparableConv2D", "SeparableConvolution1D", "SeparableConvolution2D",
    "ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D", "LocallyConnected1D", "LocallyConnected2D",
    # pooling
    "AveragePooling1D", "AveragePooling2D", "AveragePooling3D", "AvgPool1D", "AvgPool2D",
    "AvgPool3D", "MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "MaxPool1D", "MaxPool2D",
    "MaxPool3D", "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D",
    "GlobalAvgPool1D", "GlobalAvgPool2D", "GlobalAvgPool3D", "GlobalMaxPooling1D",
    "GlobalMaxPooling2D", "GlobalMaxPooling3D", "GlobalMaxPool1D", "GlobalMaxPool2D",
    "GlobalMaxPool3D", "AdaptiveAveragePooling1D", "AdaptiveAveragePooling2D",
    "AdaptiveAveragePooling3D", "AdaptiveMaxPooling1D", "AdaptiveMaxPooling2D",
    "AdaptiveMaxPooling3D",
    # normalization and regularization
    "BatchNormalization", "LayerNormalization", "GroupNormalization", "UnitNormalization",
    "RMSNormalization", "SpectralNormalization", "Normalization", "Dropout", "SpatialDropout1D",
    "SpatialDropout2D", "SpatialDropout3D", "GaussianDropout", "GaussianNoise", "AlphaDropout",
    "ActivityRegularization",
    # reshaping and merging
    "Flatten", "Reshape", "Permute", "RepeatVector", "Cropping1D", "Cropping2D", "Cropping3D",
    "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D", "UpSampling1D", "UpSampling2D",
    "UpSampling3D", "Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum", "Concatenate",
    "Dot",
    # activations
    "ReLU", "LeakyReLU", "PReLU", "ELU", "Softmax", "ThresholdedReLU",
    # attention and recurrent
    "Attention", "AdditiveAttention", "MultiHeadAttention", "GroupQueryAttention", "RNN",
    "SimpleRNN", "SimpleRNNCell", "LSTM", "LSTMCell", "GRU", "GRUCell", "StackedRNNCells",
    "Bidirectional", "TimeDistributed",
    # preprocessing that reads no files
    "Rescaling", "Resizing", "CenterCrop", "RandomCrop", "RandomFlip", "RandomRotation",
    "RandomTranslation", "RandomZoom", "RandomContrast", "RandomBrightness", "RandomHeight",
    "RandomWidth", "Discretization", "CategoryEncoding", "Hashing",
})

# tf_keras wraps raw TensorFlow calls on Keras tensors (`x + 1`, `tf.nn.relu(x)`) in these layers;
# their config names a TF API symbol that is called with arguments from the config.
TF_OP_LAYER_CLASSES = frozenset({"TFOpLambda", "SlicingOpLambda"})
_SAFE_TF_OP_PREFIXES = ("__operators__.", "math.", "nn.", "linalg.")
_SAFE_TF_OPS = frozenset({
    "reshape", "concat", "stack", "unstack", "expand_dims", "squeeze", "transpose", "cast",
    "identity", "split", "tile", "pad", "gather", "clip_by_value", "shape", "ones_like",
    "zeros_like", "where", "image.resize", "einsum", "matmul", "broadcast_to", "one_hot",
    "compat.v1.transpose", "compat.v1.squeeze", "compat.v1.pad", "compat.v1.gather",
})

# Keras 3 functional models store `x * 2` and `keras.ops.relu(x)` as operation classes from these
# modules (pure tensor math; their configs hold numbers and names).
_KERAS3_OPS_MODULE = re.compile(r"^keras(\.src)?\.ops(\.(numpy|nn|math|image|linalg|core))?$")

OPTIMIZER_CLASSES = frozenset({
    "Adadelta", "Adafactor", "Adagrad", "Adam", "AdamW", "Adamax", "Ftrl", "Lamb", "Lion",
    "Nadam", "RMSprop", "SGD", "LossScaleOptimizer",
})

OTHER_CLASSES = OPTIMIZER_CLASSES | frozenset({
    # initializers
    "Constant", "GlorotNormal", "GlorotUniform", "HeNormal", "HeUniform", "Identity",
    "IdentityInitializer", "LecunNormal", "LecunUniform", "Ones", "Orthogonal",
    "OrthogonalInitializer", "RandomNormal", "RandomUniform", "TruncatedNormal", "VarianceScaling",
    "Zeros",
    # regularizers and constraints
    "L1", "L2", "L1L2", "OrthogonalRegularizer", "MaxNorm", "MinMaxNorm", "NonNeg",
    "RadialConstraint", "UnitNorm",
    # dtype policies, and the input specs tf_keras records in SavedModel metadata
    "Policy", "DTypePolicy", "FloatDTypePolicy", "InputSpec",
    # learning-rate schedules (optimizers only appear in compile/training configs: not compiled)
    "CosineDecay", "CosineDecayRestarts",
    "ExponentialDecay", "InverseTimeDecay", "PiecewiseConstantDecay", "PolynomialDecay",
    # losses
    "BinaryCrossentropy", "BinaryFocalCrossentropy", "CategoricalCrossentropy",
    "CategoricalFocalCrossentropy", "CategoricalHinge", "CosineSimilarity", "Hinge", "Huber",
    "KLDivergence", "LogCosh", "MeanAbsoluteError", "MeanAbsolutePercentageError",
    "MeanSquaredError", "MeanSquaredLogarithmicError", "Poisson", "SparseCategoricalCrossentropy",
    "SquaredHinge",
    # metrics
    "AUC", "Accuracy", "BinaryAccuracy", "CategoricalAccuracy", "F1Score", "FBetaScore",
    "FalseNegatives", "FalsePositives", "Mean", "MeanMetricWrapper", "MeanTensor", "Precision",
    "Recall", "SparseCategoricalAccuracy", "SparseTopKCategoricalAccuracy", "Sum",
    "TopKCategoricalAccuracy", "TrueNegatives", "TruePositives", "RootMeanSquaredError",
    "LogCoshError",
})

# Serialization markers that hold plain data. Refused: "__lambda__" (bytecode) and "__typespec__"
# (names a class in an arbitrary module).
# tf_keras SavedModel metadata adds TensorShape, CompositeTensor and TypeSpec (a lookup in TF's
# registry of built-in specs, checked below).
DATA_MARKERS = frozenset({"__tuple__", "__keras_tensor__", "__numpy__", "__bytes__", "__tensor__",
                          "__slice__", "__ellipsis__", "TensorShape", "CompositeTensor"})

# Functions a config may name by string ({"class_name": "function", "config": "relu"}).
FUNCTION_NAMES = frozenset({
    "celu", "elu", "exponential", "gelu", "glu", "hard_shrink", "hard_sigmoid", "hard_silu",
    "hard_swish", "hard_tanh", "leaky_relu", "linear", "log_sigmoid", "log_softmax", "mish",
    "relu", "relu6", "selu", "sigmoid", "silu", "soft_shrink", "softmax", "softplus", "softsign",
    "sparse_plus", "sparse_sigmoid", "sparsemax", "squareplus", "swish", "tanh", "tanh_shrink",
    "threshold",
    "accuracy", "binary_accuracy", "categorical_accuracy", "sparse_categorical_accuracy",
    "top_k_categorical_accuracy", "sparse_top_k_categorical_accuracy", "binary_crossentropy",
    "categorical_crossentropy", "sparse_categorical_crossentropy", "mean_squared_error",
    "mean_absolute_error", "mse", "mae", "hinge", "squared_hinge", "kl_divergence", "poisson",
})

_KERAS_MODULE = re.compile(
    r"^(tf_)?keras((\.src)?\.(layers|models|engine|initializers|regularizers|constraints|"
    r"activations|optimizers|losses|metrics|dtype_policies|mixed_precision)(\.[A-Za-z0-9_]+)*)?$")
_FUNCTION_MODULE = re.compile(
    r"^(builtins|(tf_)?keras(\.src)?\.(activations|losses|metrics)(\.[A-Za-z0-9_]+)*)$")

_MAX_CONFIG_DEPTH = 200


def _node_name(node: dict) -> str | None:
    config = node.get("config")
    name = config.get("name") if isinstance(config, dict) else None
    name = name or node.get("name")
    return name if isinstance(name, str) and name else None


def _describe(node: dict) -> str:
    name = _node_name(node)
    return f" (named {_q(name)})" if name else ""


def _check_serialized_object(node: dict, source: str, error_cls: type[QuantLabError]) -> None:
    class_name = node["class_name"]
    if class_name.startswith("Custom>") and class_name[len("Custom>"):] in OPTIMIZER_CLASSES:
        class_name = class_name[len("Custom>"):]  # how tf_keras names its built-in optimizers
    module = node.get("module")
    registered = node.get("registered_name")
    config = node.get("config")

    if class_name == "Lambda":
        name = _node_name(node)
        layer = f"a Lambda layer {_q(name)}" if name else "a Lambda layer"
        raise _fail(error_cls, f"{source} contains {layer} (code that "
                    "would run on load); re-save the model without Lambda layers or upload a "
                    ".tflite")
    if class_name == "__lambda__":
        raise _fail(error_cls, f"{source} contains a Python lambda function (code that would run "
                    "on load); re-save the model without lambdas or upload a .tflite")
    if class_name == "function":
        if not (isinstance(config, str) and config in FUNCTION_NAMES
                and (module is None or _FUNCTION_MODULE.match(str(module)))):
            where = f"{module}.{config}" if module else str(config)
            raise _fail(error_cls, f"{source} refers to the function {_q(where)}, which is not a "
                        f"built-in Keras activation, loss or metric; {REUPLOAD_HINT}")
        if registered not in (None, "function", config):
            raise _fail(error_cls, f"{source} refers to a custom function {_q(registered)}; "
                        f"{REUPLOAD_HINT}")
        return
    if module is not None and not isinstance(module, str):
        raise _fail(error_cls, f"{source} has a malformed config (module of {_q(class_name)}); "
                    "re-save the model with model.save(...)")
    if class_name in TF_OP_LAYER_CLASSES:
        function = config.get("function") if isinstance(config, dict) else None
        if not (isinstance(function, str)
                and (function in _SAFE_TF_OPS or function.startswith(_SAFE_TF_OP_PREFIXES))):
            raise _fail(error_cls, f"{source} calls the TensorFlow function {_q(function)}"
                        f"{_describe(node)}, which QuantLab does not load from uploads (only "
                        "math/nn tensor ops are allowed); wrap it in a built-in layer or upload a "
                        ".tflite")
        if module is not None and not _KERAS_MODULE.match(module):
            raise _fail(error_cls, f"{source} refers to code in module {_q(module)} (custom code "
                        f"would have to run on the server); {REUPLOAD_HINT}")
        if registered not in (None, class_name):
            raise _fail(error_cls, f"{source} uses the custom object {_q(registered)}; "
                        f"{REUPLOAD_HINT}")
        return
    if module is not None and _KERAS3_OPS_MODULE.match(module):
        if not re.fullmatch(r"[A-Z][A-Za-z0-9]*", class_name):
            operation = f"{module}.{class_name}"
            raise _fail(error_cls, f"{source} uses the unknown operation {_q(operation)}; "
                        f"{REUPLOAD_HINT}")
        if registered not in (None, class_name):
            raise _fail(error_cls, f"{source} uses the custom object {_q(registered)}; "
                        f"{REUPLOAD_HINT}")
        return
    if module is not None and not _KERAS_MODULE.match(module):
        raise _fail(error_cls, f"{source} refers to code in module {_q(module)} (custom code would "
                    f"have to run on the server); {REUPLOAD_HINT}")
    if class_name in DATA_MARKERS:
        return
    if class_name == "TypeSpec" and module is None:
        spec = node.get("type_spec")
        if not (isinstance(spec, str) and re.fullmatch(r"tf\.[A-Za-z0-9_.]+", spec)):
            raise _fail(error_cls, f"{source} refers to the type spec {_q(spec)}, which is not a "
                        f"built-in TensorFlow spec; {REUPLOAD_HINT}")
        return
    if registered not in (None, class_name):
        raise _fail(error_cls, f"{source} uses the custom object {_q(registered)} (registered "
                    f"custom code cannot be loaded safely); {REUPLOAD_HINT}")
    if class_name not in LAYER_CLASSES | MODEL_CLASSES | OTHER_CLASSES:
        raise _fail(error_cls, f"{source} uses {_q(class_name)}{_describe(node)}, which is not a "
                    "built-in Keras layer QuantLab can load safely (custom code would have to run "
                    f"on the server); {REUPLOAD_HINT}")


def _walk_config(value: Any, source: str, error_cls: type[QuantLabError] = ModelError) -> None:
    """Check every serialized object anywhere in a config tree (iteratively: no recursion limit)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > _MAX_CONFIG_DEPTH:
            raise _fail(error_cls, f"{source} has a config nested more than {_MAX_CONFIG_DEPTH} "
                        "levels deep; re-save the model with model.save(...)")
        if isinstance(node, dict):
            if node.get("function_type") == "lambda" or node.get("output_shape_type") == "lambda":
                raise _fail(error_cls, f"{source} contains serialized Python code (a "
                            "Lambda-style function); re-save the model without Lambda layers or "
                            "upload a .tflite")
            class_name = node.get("class_name")
            if class_name is not None:
                if not isinstance(class_name, str):
                    raise _fail(error_cls, f"{source} has a malformed config (class_name is not a "
                                "string); re-save the model with model.save(...)")
                _check_serialized_object(node, source, error_cls)
            stack.extend((child, depth + 1) for child in node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend((child, depth + 1) for child in node)


@_user_errors(ModelError)
def check_model_config(config: dict, source_name: str,
                       error_cls: type[QuantLabError] = ModelError) -> None:
    """Refuse a Keras model config that would run code when deserialized.

    Walks the whole tree (Sequential and Functional layer graphs, nested models, wrappers, RNN
    cells, initializers, compile configs). Refused: Lambda layers and `__lambda__` functions,
    serialized bytecode anywhere, TF-op layers calling anything but math/nn tensor ops, class names
    outside the static built-in allow-lists (`LAYER_CLASSES`, `MODEL_CLASSES`, `OTHER_CLASSES`),
    `module` entries outside Keras' layer/initializer/... namespaces (e.g. `os`, `keras.config`,
    `keras.utils`), custom `registered_name`s (`"package>Name"`) and named functions other than
    built-in activations, losses and metrics.
    """
    if not isinstance(config, dict) or config.get("class_name") not in MODEL_CLASSES:
        found = config.get("class_name") if isinstance(config, dict) else type(config).__name__
        raise _fail(error_cls, f"{source_name} does not describe a Keras model (top-level class "
                    f"{_q(found)}); save the whole model with model.save(...)")
    _walk_config(config, source_name, error_cls)


# --------------------------------------------------------------------------------------------------
# HDF5 and .keras inspection (no TensorFlow)
# --------------------------------------------------------------------------------------------------

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _keras_major(version: str | None) -> int | None:
    match = re.match(r"\s*(\d+)", version or "")
    return int(match.group(1)) if match else None


def _parse_json(raw: bytes | str, source: str, what: str) -> Any:
    try:
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8")
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _fail(ModelError, f"{source} has an unreadable {what} (not valid JSON); re-save the "
                    "model with model.save(...)") from None


def _check_h5_links(h5file: Any, source: str) -> None:
    """Refuse external links and external/virtual datasets: they read other files on the server."""
    import h5py

    stack = [h5file]
    seen: set[Any] = set()
    while stack:
        group = stack.pop()
        if group.id in seen:
            continue
        seen.add(group.id)
        for name in group:
            link = group.get(name, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                raise _fail(ModelError, f"{source} links to another file ({_q(link.filename)}); "
                            "save the model into a single file with model.save(...)")
            if isinstance(link, h5py.SoftLink):
                continue
            obj = group.get(name)
            if isinstance(obj, h5py.Group):
                stack.append(obj)
            elif isinstance(obj, h5py.Dataset):
                if obj.external or obj.is_virtual:
                    raise _fail(ModelError, f"{source} stores data in other files (dataset "
                                f"{_q(obj.name)}); save the model into a single file with "
                                "model.save(...)")


def _h5_text_attr(attrs: Any, key: str) -> str | None:
    value = attrs.get(key)
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
        return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
    return str(value)


@_user_errors(ModelError)
def inspect_h5_config(path: str | os.PathLike) -> dict:
    """Read an HDF5 model file's config with h5py only (no TensorFlow, nothing deserialized).

    Returns ``{"config": dict, "keras_version": str | None, "keras_major": int | None}``.
    Refuses non-HDF5 files, weights-only files and files linking to other files.
    """
    import h5py

    path = Path(path)
    source = path.name
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        raise _fail(ModelError, f"{source} could not be read; upload the file again") from None
    if head != _HDF5_SIGNATURE:
        raise _fail(ModelError, f"{source} is not an HDF5 model file; save the model with "
                    "model.save('model.h5') or upload a .keras file")
    try:
        with h5py.File(path, "r") as h5:
            _check_h5_links(h5, source)
            raw = _h5_text_attr(h5.attrs, "model_config")
            version = _h5_text_attr(h5.attrs, "keras_version")
    except QuantLabError:
        raise
    except Exception as exc:  # h5py raises OSError, KeyError, RuntimeError... on damaged files
        raise _fail(ModelError, f"{source} is a damaged or truncated HDF5 file ({_short(exc)}); "
                    "upload the file again or re-save the model") from None
    if raw is None:
        raise _fail(ModelError, f"{source} holds only weights (no model_config); save the whole "
                    "model with model.save('model.h5') or upload a .keras file")
    config = _parse_json(raw, source, "model_config")
    if not isinstance(config, dict):
        raise _fail(ModelError, f"{source} has a malformed model_config; re-save the model with "
                    "model.save(...)")
    return {"config": config, "keras_version": version, "keras_major": _keras_major(version)}


def _read_member(zf: zipfile.ZipFile, name: str, source: str, max_bytes: int) -> bytes:
    info = zf.getinfo(name)
    if info.file_size > max_bytes:
        raise _fail(ModelError, f"{source}: {name} is {_human(info.file_size)}, over the "
                    f"{_human(max_bytes)} limit; upload a smaller model")
    try:
        with zf.open(info) as fh:
            data = fh.read(max_bytes + 1)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as exc:
        raise _fail(ModelError, f"{source} is a damaged archive ({_short(exc)}); upload the file "
                    "again or re-save the model") from None
    if len(data) > max_bytes:
        raise _fail(ModelError, f"{source}: {name} is larger than the "
                    f"{_human(max_bytes)} limit; upload a smaller model")
    return data


def _is_keras_archive(zf: zipfile.ZipFile) -> bool:
    return "config.json" in zf.namelist()


@_user_errors(ModelError)
def inspect_keras_archive(path: str | os.PathLike, limits: UploadLimits = DEFAULT_LIMITS) -> dict:
    """Read a `.keras` archive's config without deserializing it.

    Returns ``{"config": dict, "keras_version": str | None, "keras_major": int | None}``; a
    `keras_major` of 3 is a Keras 3 file, 2 a tf_keras file. Member names, types, counts and sizes
    are checked like any zip, and `model.weights.h5` is checked for links to other files.
    """
    path = Path(path)
    source = path.name
    with _open_zip(path, source, limits) as zf:
        _check_zip_members(zf, source, limits)
        names = set(zf.namelist())
        if "config.json" not in names or "metadata.json" not in names:
            raise _fail(ModelError, f"{source} is not a Keras archive (expected config.json and "
                        "metadata.json inside); re-save with model.save('model.keras') or upload "
                        "a .h5 or .tflite")
        config = _parse_json(_read_member(zf, "config.json", source, 64 * MB), source,
                             "config.json")
        metadata = _parse_json(_read_member(zf, "metadata.json", source, MB), source,
                               "metadata.json")
        if "model.weights.h5" in names:
            import h5py

            weights = _read_member(zf, "model.weights.h5", source, limits.max_unpacked_bytes)
            try:
                with h5py.File(io.BytesIO(weights), "r") as h5:
                    _check_h5_links(h5, source)
            except QuantLabError:
                raise
            except Exception as exc:
                raise _fail(ModelError, f"{source} has damaged weights ({_short(exc)}); re-save "
                            "the model with model.save('model.keras')") from None
    if not isinstance(config, dict):
        raise _fail(ModelError, f"{source} has a malformed config.json; re-save the model with "
                    "model.save('model.keras')")
    version = metadata.get("keras_version") if isinstance(metadata, dict) else None
    version = str(version) if version is not None else None
    return {"config": config, "keras_version": version, "keras_major": _keras_major(version)}


# --------------------------------------------------------------------------------------------------
# SavedModel inspection (protobufs only; nothing executed)
# --------------------------------------------------------------------------------------------------

# Ops that read or write files, call back into Python or leave the process. Allowed only inside
# the checkpoint save/restore functions the SavedModel's saver_def names.
DANGEROUS_TF_OPS = frozenset({
    "ReadFile", "WriteFile", "MatchingFiles", "ImmutableConst", "PyFunc", "PyFuncStateless",
    "EagerPyFunc", "Save", "SaveV2", "SaveSlices", "MergeV2Checkpoints", "Restore", "RestoreV2",
    "RestoreSlice", "Print", "PrintV2", "DecodeProtoV2", "EncodeProto", "RemoteCall",
    "CreateSummaryFileWriter", "CreateSummaryDbWriter", "WriteSummary", "WriteScalarSummary",
    "WriteHistogramSummary", "WriteImageSummary", "WriteAudioSummary", "WriteGraphSummary",
    "WriteRawProtoSummary", "ImportEvent", "FlushSummaryWriter", "SummaryWriter",
    "DatasetToTFRecord", "ExperimentalDatasetToTFRecord", "SaveDataset", "SaveDatasetV2",
    "LoadDataset", "TFRecordDataset", "TFRecordDatasetV2", "FixedLengthRecordDataset",
    "FixedLengthRecordDatasetV2", "TextLineDataset", "CSVDataset", "CSVDatasetV2",
    "ExperimentalCSVDataset", "SnapshotDataset", "SnapshotDatasetV2", "SnapshotDatasetReader",
    "CacheDataset", "CacheDatasetV2", "MatchingFilesDataset", "ExperimentalMatchingFilesDataset",
    "LMDBDataset", "ExperimentalLMDBDataset", "SqlDataset", "ExperimentalSqlDataset",
    "InitializeTableFromTextFile", "InitializeTableFromTextFileV2", "LoadAndRemapMatrix",
    "GenerateVocabRemapping", "DebugIdentity", "DebugIdentityV2", "DebugIdentityV3",
    "DebugNanCount", "DebugNumericSummary", "DebugNumericSummaryV2", "WholeFileReader",
    "WholeFileReaderV2", "TextLineReader", "TextLineReaderV2", "TFRecordReader",
    "TFRecordReaderV2", "FixedLengthRecordReader", "FixedLengthRecordReaderV2", "LMDBReader",
    "IdentityReader", "IdentityReaderV2", "ReaderRead", "ReaderReadV2", "ReaderReadUpTo",
    "ReaderReadUpToV2", "ReaderRestoreState", "ReaderRestoreStateV2", "ReaderSerializeState",
    "ReaderSerializeStateV2",
})


def _parse_saved_model(root: Path, source: str) -> Any:
    from tensorflow.core.protobuf import saved_model_pb2

    pb = root / "saved_model.pb"
    proto = saved_model_pb2.SavedModel()
    try:
        proto.ParseFromString(pb.read_bytes())
    except Exception as exc:  # google.protobuf.message.DecodeError and friends
        raise _fail(ModelError, f"{source} has a damaged saved_model.pb ({_short(exc)}); re-export "
                    "the SavedModel") from None
    serving = [mg for mg in proto.meta_graphs if "serve" in mg.meta_info_def.tags]
    if not serving:
        raise _fail(ModelError, f"{source} has no 'serve' graph; export it with "
                    "tf.saved_model.save(...) or model.export(...)")
    return serving[0]


def _called_functions(node_def: Any) -> Iterator[str]:
    for attr in node_def.attr.values():
        if attr.HasField("func"):
            yield attr.func.name
        if attr.HasField("list"):
            for func in attr.list.func:
                yield func.name
    # A node may also call a library function directly by using it as its op.
    yield node_def.op


def _check_saved_model_graph(meta_graph: Any, source: str) -> None:
    """Scan what loading and inference would run for ops that touch files or call Python."""
    library = {f.signature.name: f for f in meta_graph.graph_def.library.function}
    saver = meta_graph.saver_def
    saver_nodes = {name.split(":")[0] for name in (saver.save_tensor_name, saver.restore_op_name,
                                                   saver.filename_tensor_name) if name}

    roots: list[str] = list(meta_graph.object_graph_def.concrete_functions.keys())
    for node in meta_graph.graph_def.node:
        if node.name in saver_nodes:
            continue
        if node.op in DANGEROUS_TF_OPS:
            raise _dangerous_op(source, node.op)
        roots.extend(_called_functions(node))

    seen: set[str] = set()
    while roots:
        name = roots.pop()
        if name in seen or name not in library:
            continue
        seen.add(name)
        for node in library[name].node_def:
            if node.op in DANGEROUS_TF_OPS:
                raise _dangerous_op(source, node.op)
            roots.extend(_called_functions(node))

    for asset in meta_graph.asset_file_def:
        parts = PurePosixPath(asset.filename.replace("\\", "/")).parts
        if asset.filename.startswith(("/", "\\")) or ".." in parts or re.match(r"^[A-Za-z]:",
                                                                                asset.filename):
            raise _fail(ModelError, f"{source} refers to an asset outside its folder "
                        f"({_q(asset.filename)}); re-export the SavedModel")


def _dangerous_op(source: str, op: str) -> QuantLabError:
    return _fail(ModelError, f"{source} contains the TensorFlow op {_q(op)}, which can read or "
                 "write files or run Python on the server; export the model without it or upload a "
                 ".tflite")


def _check_keras_metadata(root: Path, source: str) -> bool:
    """Walk the layer configs tf_keras would deserialize; True if this is a Keras SavedModel."""
    path = root / "keras_metadata.pb"
    if not path.exists():
        return False
    from tf_keras.protobuf import saved_metadata_pb2

    metadata = saved_metadata_pb2.SavedMetadata()
    try:
        metadata.ParseFromString(path.read_bytes())
    except Exception as exc:
        raise _fail(ModelError, f"{source} has a damaged keras_metadata.pb ({_short(exc)}); "
                    "re-save the model") from None
    for node in metadata.nodes:
        _walk_config(_parse_json(node.metadata, source, "keras_metadata.pb"), source)
    return True


def _signature_shapes(meta_graph: Any, source: str) -> tuple[tuple[int, ...], int]:
    signatures = meta_graph.signature_def
    if "serving_default" not in signatures:
        raise _fail(ModelError, f"{source} has no serving_default signature; export it with "
                    "tf.saved_model.save(model, path, signatures=...) or model.export(path)")
    signature = signatures["serving_default"]
    if len(signature.inputs) != 1 or len(signature.outputs) != 1:
        raise _fail(ModelError, f"{source} has {len(signature.inputs)} inputs and "
                    f"{len(signature.outputs)} outputs; QuantLab compares single-input, "
                    "single-output classifiers")

    def dims(info: Any) -> list[int | None]:
        if info.tensor_shape.unknown_rank:
            return []
        return [d.size if d.size >= 0 else None for d in info.tensor_shape.dim]

    (input_info,) = signature.inputs.values()
    (output_info,) = signature.outputs.values()
    return _classifier_shapes(dims(input_info), dims(output_info), source)


# --------------------------------------------------------------------------------------------------
# Loading models
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedModel:
    """What an uploaded model became.

    kind: "tf_keras" (keras_model is a tf_keras.Model; every technique works),
    "keras3-savedmodel" (a Keras 3 upload exported to saved_model_dir; post-training only) or
    "savedmodel" (a plain SavedModel in saved_model_dir; post-training only).
    input_shape is per sample (no batch dimension); num_classes is the output width.
    """

    kind: str
    source_name: str
    input_shape: tuple[int, ...]
    num_classes: int
    keras_model: Any = None
    saved_model_dir: Path | None = None
    keras_version: str | None = None
    notes: tuple[str, ...] = ()
    keras3_file: Path | None = None  # the vetted Keras 3 file itself (its baseline runs in Keras 3)
    inputs: tuple[dict, ...] = ()   # several inputs or outputs: each (name, shape, dtype) / (name, shape)
    outputs: tuple[dict, ...] = ()

    @property
    def supports_training_techniques(self) -> bool:
        return self.kind == "tf_keras"

    def require_keras_model(self, technique: str = TRAINING_TECHNIQUES_HINT) -> Any:
        """The tf_keras model, or a ModelError saying why `technique` cannot run on this upload."""
        if self.kind == "tf_keras":
            return self.keras_model
        if self.kind == "keras3-savedmodel":
            raise _fail(ModelError, f"{self.source_name} is a Keras 3 model; {technique} "
                        "(tensorflow-model-optimization) can only wrap a tf_keras (Keras 2) model: "
                        "re-save it with tf_keras or use post-training techniques")
        raise _fail(ModelError, f"{self.source_name} is a plain TensorFlow SavedModel (no Keras "
                    f"layers); {technique} (tensorflow-model-optimization) can only wrap a "
                    "tf_keras (Keras 2) model: upload a tf_keras .h5/.keras or use post-training "
                    "techniques")


def _classifier_shapes(input_dims: Any, output_dims: Any,
                       source: str) -> tuple[tuple[int, ...], int]:
    input_dims = list(input_dims or [])
    output_dims = list(output_dims or [])
    if len(input_dims) < 2 or any(d is None for d in input_dims[1:]):
        shown = tuple(input_dims[1:]) if input_dims else "unknown"
        raise _fail(ModelError, f"{source} has input shape {shown} per sample, which is not fixed; "
                    "re-save the model with a fully defined input shape, e.g. Input((28, 28, 1))")
    if len(output_dims) != 2 or output_dims[-1] is None:
        raise _fail(ModelError, f"{source} has output shape {tuple(output_dims[1:])} per sample; "
                    "QuantLab compares classifiers with one output per class, shape (classes,)")
    if output_dims[-1] < 2:
        raise _fail(ModelError, f"{source} has a single output unit; QuantLab compares classifiers "
                    "with one output per class: re-save it with a Dense(num_classes) output")
    return tuple(int(d) for d in input_dims[1:]), int(output_dims[-1])


def _tensor_name(tensor: Any, fallback: str) -> str:
    name = str(getattr(tensor, "name", "") or fallback)
    return name.split(":")[0].split("/")[0] or fallback


def _dtype_name(tensor: Any) -> str:
    dtype = getattr(tensor, "dtype", "float32")
    return str(getattr(dtype, "name", dtype))


def model_io(model: Any, source: str) -> tuple[tuple[dict, ...], tuple[dict, ...]]:
    """Each input (name, per-sample shape, dtype) and output (name, per-sample shape) of a Keras
    model, in the model's own order; every shape must be fixed."""
    input_names = list(getattr(model, "input_names", None) or [])
    output_names = list(getattr(model, "output_names", None) or [])
    inputs = []
    for i, tensor in enumerate(model.inputs):
        dims = list(tensor.shape)[1:]
        name = input_names[i] if i < len(input_names) else _tensor_name(tensor, f"input_{i}")
        if not dims or any(d is None for d in dims):
            raise _fail(ModelError, f"{source}: input {name!r} has shape {tuple(dims)} per sample, "
                        "which is not fixed; re-save the model with a fully defined input shape")
        inputs.append({"name": name, "shape": [int(d) for d in dims], "dtype": _dtype_name(tensor)})
    outputs = []
    for i, tensor in enumerate(model.outputs):
        name = output_names[i] if i < len(output_names) else _tensor_name(tensor, f"output_{i}")
        outputs.append({"name": name, "shape": [d if d is None else int(d) for d in list(tensor.shape)[1:]]})
    return tuple(inputs), tuple(outputs)


def _keras_model_shapes(model: Any, source: str) -> tuple[tuple[int, ...], int]:
    """(per-sample input shape, classes) of a one-input, one-output model; for several inputs or
    outputs, the packed input size and the first output's classes (see LoadedModel)."""
    inputs, outputs = model.inputs, model.outputs
    if len(inputs) == 1 and len(outputs) == 1:
        return _classifier_shapes(list(inputs[0].shape), list(outputs[0].shape), source)
    specs, heads = model_io(model, source)
    classifiers = [head for head in heads if len(head["shape"]) == 1 and (head["shape"][0] or 0) >= 2]
    if not classifiers:
        raise _fail(ModelError, f"{source} has no output of shape (classes,); QuantLab needs one "
                    "classifier output to measure accuracy and agreement on")
    size = sum(math.prod(spec["shape"]) for spec in specs)
    return (int(size),), int(classifiers[0]["shape"][0])


def _load_error(source: str, exc: BaseException) -> QuantLabError:
    return _fail(ModelError, f"{source} could not be loaded ({_short(exc)}); re-save it with "
                 "model.save(...) from tf_keras or upload a .tflite")


def _load_tf_keras(path: Path, source: str, version: str | None, **kwargs: Any) -> LoadedModel:
    from quantlab.tfcompat import import_tensorflow

    _, tf_keras = import_tensorflow()
    try:
        model = tf_keras.models.load_model(str(path), compile=False, custom_objects={}, **kwargs)
    except QuantLabError:
        raise
    except Exception as exc:
        raise _load_error(source, exc) from None
    input_shape, num_classes = _keras_model_shapes(model, source)
    model, notes = _computing_in_float32(tf_keras, model)
    inputs, outputs = model_io(model, source)
    return LoadedModel("tf_keras", source, input_shape, num_classes, keras_model=model,
                       keras_version=version, inputs=inputs, outputs=outputs, notes=notes)


def _computing_in_float32(tf_keras: Any, model: Any,
                          baseline: str = "the baseline measures that copy too"
                          ) -> tuple[Any, tuple[str, ...]]:
    """A mixed-precision model as its float32 copy (same weights), and the note saying so (and
    what the baseline row measures)."""
    from quantlab.keras_copy import float32_copy, reduced_precision_layers

    reduced = reduced_precision_layers(model)
    if not reduced:
        return model, ()
    policies = sorted({policy for _, policy in reduced})
    return float32_copy(tf_keras, model), (
        f"mixed precision ({', '.join(policies)} in {len(reduced)} layers): converted and "
        f"fine-tuned as float32 with the same weights (the TFLite converter cannot lower the 16-bit "
        f"casts); {baseline}",)


def _load_keras3(path: Path, source: str, version: str | None, workdir: Path) -> LoadedModel:
    """Load a vetted Keras 3 file with Keras 3 and rebuild it in tf_keras (keras3_rebuild), so that
    every technique applies; when a layer has no tf_keras equivalent, export it to a SavedModel
    instead (post-training techniques only) and say which layer."""
    from quantlab.tfcompat import import_tensorflow

    import_tensorflow()  # TF_USE_LEGACY_KERAS=1 first; Keras 3 itself is unaffected by it
    try:
        import keras

        model = keras.saving.load_model(str(path), compile=False, safe_mode=True)
    except Exception as exc:
        raise _load_error(source, exc) from None
    input_shape, num_classes = _keras_model_shapes(model, source)
    from quantlab.keras3_rebuild import rebuild_in_tf_keras

    try:
        rebuilt = rebuild_in_tf_keras(model, source)
    except QuantLabError as refusal:
        why = str(refusal)
    else:
        tf_keras_model, float32_notes = _computing_in_float32(
            import_tensorflow()[1], rebuilt.model,
            baseline="the baseline and the float reference run the uploaded file in mixed precision")
        inputs, outputs = model_io(tf_keras_model, source)
        return LoadedModel(
            "tf_keras", source, input_shape, num_classes, keras_model=tf_keras_model,
            keras_version=version, keras3_file=path, inputs=inputs, outputs=outputs,
            notes=(*rebuilt.notes, *float32_notes, "Keras 3 model: the baseline and the float reference run in "
                   "Keras 3 itself; conversions and fine-tuning start from the tf_keras rebuild."))
    export_dir = Path(tempfile.mkdtemp(prefix="keras3-", dir=workdir)) / "saved_model"
    try:
        model.export(str(export_dir), verbose=False)
    except Exception as exc:
        raise _fail(ModelError, f"{source} is a Keras 3 model that could not be exported to a "
                    f"SavedModel ({_short(exc)}); re-save it with tf_keras or upload a .tflite"
                    ) from None
    return LoadedModel(
        "keras3-savedmodel", source, input_shape, num_classes, saved_model_dir=export_dir,
        keras_version=version, keras3_file=path,
        notes=(f"Keras 3 model exported to a SavedModel: post-training techniques only ({why})",),
    )


def _load_h5(path: Path, workdir: Path, limits: UploadLimits) -> LoadedModel:
    check_file_size(path, limits, ModelError)
    info = inspect_h5_config(path)
    check_model_config(info["config"], path.name)
    if info["keras_major"] == 3:
        return _load_keras3(path, path.name, info["keras_version"], workdir)
    # tf_keras ignores safe_mode for .h5: the config check above is what keeps Lambdas out.
    return _load_tf_keras(path, path.name, info["keras_version"])


def _load_keras_file(path: Path, workdir: Path, limits: UploadLimits,
                     source: str | None = None) -> LoadedModel:
    source = source or path.name
    info = inspect_keras_archive(path, limits)
    check_model_config(info["config"], source)
    if info["keras_major"] not in (2, 3):
        raise _fail(ModelError, f"{source} was saved by Keras {info['keras_version']!r}, which "
                    "QuantLab cannot read; re-save it with tf_keras 2.x or Keras 3")
    if path.suffix != ".keras":  # both Keras loaders pick the format by extension
        renamed = Path(tempfile.mkdtemp(prefix="keras-", dir=workdir)) / "model.keras"
        shutil.copyfile(path, renamed)
        path = renamed
    if info["keras_major"] == 3:
        return _load_keras3(path, source, info["keras_version"], workdir)
    return _load_tf_keras(path, source, info["keras_version"], safe_mode=True)


def _load_saved_model_dir(root: Path, source: str) -> LoadedModel:
    from quantlab.tfcompat import import_tensorflow

    import_tensorflow()
    meta_graph = _parse_saved_model(root, source)
    _check_saved_model_graph(meta_graph, source)
    is_keras = _check_keras_metadata(root, source)
    input_shape, num_classes = _signature_shapes(meta_graph, source)
    plain_note = ("Plain TensorFlow SavedModel: post-training techniques only; "
                  f"{TRAINING_TECHNIQUES_HINT} need a tf_keras (Keras 2) model.")
    if is_keras:
        try:
            loaded = _load_tf_keras(root, source, None)
        except ModelError as exc:
            return LoadedModel("savedmodel", source, input_shape, num_classes,
                               saved_model_dir=root,
                               notes=(f"tf_keras could not rebuild the Keras layers ({exc}).",
                                      plain_note))
        return LoadedModel("tf_keras", source, loaded.input_shape, loaded.num_classes,
                           keras_model=loaded.keras_model, saved_model_dir=root)
    return LoadedModel("savedmodel", source, input_shape, num_classes, saved_model_dir=root,
                       notes=(plain_note,))


def _load_zip(path: Path, workdir: Path, limits: UploadLimits, depth: int) -> LoadedModel:
    source = path.name
    with _open_zip(path, source, limits) as zf:
        is_keras = _is_keras_archive(zf)
    if is_keras:  # a .keras archive uploaded as .zip
        return _load_keras_file(path, workdir, limits, source=source)
    dest = Path(tempfile.mkdtemp(prefix="upload-", dir=workdir)) / "extracted"
    _extract_zip(path, dest, limits)
    roots = _saved_model_roots(dest)
    if len(roots) == 1:
        return _load_saved_model_dir(roots[0], source)
    if len(roots) > 1:
        raise _fail(ModelError, f"{source} contains {len(roots)} SavedModels; zip exactly one "
                    "SavedModel folder")
    inner = [p for p in dest.rglob("*") if p.is_file() and "__MACOSX" not in p.parts
             and p.suffix.lower() in (".keras", ".h5", ".hdf5")]
    if len(inner) == 1 and depth == 0:
        return _load_model_path(inner[0], workdir, limits, depth + 1)
    raise _fail(ModelError, f"{source} contains no saved_model.pb and no single .keras/.h5 file; "
                "zip the folder written by model.save(...) / tf.saved_model.save(...)")


def _load_model_path(path: Path, workdir: Path, limits: UploadLimits, depth: int) -> LoadedModel:
    if path.is_symlink():
        raise _fail(ModelError, f"{path.name} is a symbolic link; upload the model itself")
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise _fail(ModelError, f"{path.name} has no saved_model.pb; pick the folder written "
                        "by model.save(...) / tf.saved_model.save(...)")
        _check_directory_tree(path, path.name, limits)
        return _load_saved_model_dir(path, path.name)
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        return _load_h5(path, workdir, limits)
    if suffix == ".keras":
        return _load_keras_file(path, workdir, limits)
    if suffix == ".zip":
        return _load_zip(path, workdir, limits, depth)
    if suffix == ".tflite":
        raise _fail(ModelError, f"{path.name} is a TFLite model, not a Keras model; add it as a "
                    "ready-made .tflite (load_tflite_bytes) or upload the Keras source model")
    raise _fail(ModelError, f"{path.name} has an unsupported type '{path.suffix}'; upload a .h5, "
                ".keras, zipped SavedModel or .tflite")


@_user_errors(ModelError)
def load_keras_model(path: str | os.PathLike, workdir: str | os.PathLike,
                     limits: UploadLimits = DEFAULT_LIMITS) -> LoadedModel:
    """Validate and load an uploaded model: .h5, .keras, a SavedModel folder, or a .zip of either.

    The config (or SavedModel protobufs) is checked before anything is deserialized; Keras files
    then load with `compile=False` (and `safe_mode=True` where the loader honours it). Extracted
    archives and Keras 3 exports are written under `workdir` and referenced by the result, so keep
    `workdir` as long as the result is used. Any failure is a one-line `ModelError`.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    return _load_model_path(Path(path), workdir, limits, depth=0)


TFLITE_IDENTIFIER = b"TFL3"


@_user_errors(ModelError)
def load_tflite_bytes(path: str | os.PathLike, limits: UploadLimits = DEFAULT_LIMITS) -> bytes:
    """The bytes of an uploaded .tflite, after checking its size and flatbuffer identifier."""
    path = Path(path)
    check_file_size(path, limits, ModelError)
    data = path.read_bytes()
    if len(data) < 8 or data[4:8] != TFLITE_IDENTIFIER:
        raise _fail(ModelError, f"{path.name} is not a TFLite flatbuffer (no 'TFL3' identifier); "
                    "upload a file written by TFLiteConverter.convert()")
    root_offset = int.from_bytes(data[0:4], "little")
    if root_offset < 8 or root_offset >= len(data):
        raise _fail(ModelError, f"{path.name} is a truncated or damaged TFLite file; convert the "
                    "model again and upload the new file")
    return data


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------

REQUIRED_ARRAYS = ("x_test",)
# A model with several inputs takes one array per input and split: x_test_<input name>, ...
PER_INPUT_ARRAY = re.compile(r"^x_(test|calib|train)_[A-Za-z0-9_.\-]{1,64}$")
OPTIONAL_ARRAYS = ("y_test", "x_train", "y_train", "x_calib")
_NPZ_EXAMPLE = "np.savez('data.npz', x_test=x, y_test=y)"


def _npz_headers(path: Path, source: str,
                 limits: UploadLimits) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Read every .npy header in the archive without loading data; refuse objects and lies."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise _fail(DatasetError, f"{source} is not an .npz archive (corrupt or another format); "
                    f"save the arrays with {_NPZ_EXAMPLE}") from None
    headers: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    total = 0
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        if len(infos) > limits.max_archive_files:
            raise _fail(DatasetError, f"{source} holds {len(infos)} files, over the limit of "
                        f"{limits.max_archive_files}; save only the arrays QuantLab needs")
        for info in infos:
            if not info.filename.endswith(".npy") or "/" in info.filename:
                raise _fail(DatasetError, f"{source} contains {_q(info.filename)}, which is not an "
                            f"array; save only arrays with {_NPZ_EXAMPLE}")
            name = info.filename[:-4]
            total += info.file_size
            if total > limits.max_unpacked_bytes:
                raise _fail(DatasetError, f"{source} unpacks to more than "
                            f"{_human(limits.max_unpacked_bytes)}; upload fewer or smaller arrays")
            try:
                with zf.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
                    else:
                        raise ValueError(f"unsupported .npy format version {version}")
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, SyntaxError) as exc:
                raise _fail(DatasetError, f"{source}: array {_q(name)} has a damaged header "
                            f"({_short(exc)}); save the arrays again with {_NPZ_EXAMPLE}") from None
            if dtype.hasobject:
                raise _fail(DatasetError, f"{source}: array {_q(name)} holds Python objects "
                            "(pickled data that could run code when loaded); save plain numeric "
                            "arrays, e.g. np.asarray(x, dtype=np.float32)")
            nbytes = math.prod(shape) * dtype.itemsize
            if nbytes > info.file_size:
                raise _fail(DatasetError, f"{source}: array {_q(name)} claims shape {shape} but "
                            "the file is too small for it (truncated or damaged); save the arrays "
                            f"again with {_NPZ_EXAMPLE}")
            headers[name] = (tuple(shape), dtype)
    return headers


def _check_numeric(name: str, array: np.ndarray, source: str) -> None:
    kind = array.dtype.kind
    if kind not in "biuf":
        raise _fail(DatasetError, f"{source}: array '{name}' has dtype {array.dtype}, not a real "
                    f"number type; save it as float32 or an integer type")
    if kind == "f" and array.size and not np.isfinite(array).all():
        nans = int(np.count_nonzero(np.isnan(array)))
        infs = int(np.count_nonzero(np.isinf(array)))
        raise _fail(DatasetError, f"{source}: array '{name}' contains {nans} NaN and {infs} Inf "
                    "values; replace or drop those samples before saving")


def _is_one_hot(array: np.ndarray) -> bool:
    return (array.ndim == 2 and array.shape[1] > 1 and bool(np.isin(array, (0, 1)).all())
            and bool((array.sum(axis=1) == 1).all()))


def _labels(name: str, array: np.ndarray, source: str, notes: list[str] | None = None) -> np.ndarray:
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if _is_one_hot(array):
        if notes is not None:
            notes.append(f"{name} is one-hot ({array.shape[1]} columns): class = argmax per row")
        return np.argmax(array, axis=1).astype(np.int64)
    if array.ndim != 1:
        raise _fail(DatasetError, f"{source}: labels '{name}' have shape {array.shape}; save a 1-D "
                    "array of class indices or one-hot rows (soft labels: use np.argmax(y, axis=1))")
    if array.dtype.kind == "f" and not np.all(np.mod(array, 1) == 0):
        raise _fail(DatasetError, f"{source}: labels '{name}' are not whole numbers; save class "
                    "indices 0..num_classes-1 as integers")
    if array.size and array.min() < 0:
        raise _fail(DatasetError, f"{source}: labels '{name}' include {array.min()}; class indices "
                    "must be 0 or more")
    return array.astype(np.int64)


@_user_errors(DatasetError)
def load_npz_dataset(path: str | os.PathLike, limits: UploadLimits = DEFAULT_LIMITS,
                     notes: list[str] | None = None) -> dict[str, np.ndarray]:
    """Load an uploaded .npz dataset: x_test, optionally y_test, x_train+y_train and x_calib.

    Arrays must be real numbers (no objects, strings or complex), features finite, labels
    whole numbers >= 0 given as a 1-D array (or (N, 1)) or as one-hot rows (turned into class
    indices with argmax, said in `notes`); each x_* has one sample per row and each x/y pair has
    the same length. Without y_test the dataset is unlabelled (compared on fidelity only). Labels
    are returned as int64, features unchanged.
    """
    path = Path(path)
    source = path.name
    check_file_size(path, limits, DatasetError)
    headers = _npz_headers(path, source, limits)
    accepted = REQUIRED_ARRAYS + OPTIONAL_ARRAYS
    per_input = {name for name in headers if PER_INPUT_ARRAY.match(name)}
    if per_input and "x_test" in headers:
        raise _fail(DatasetError, f"{source} has both x_test and per-input arrays ({sorted(per_input)[0]}); "
                    "for one input save x_test, for several save x_test_<input name> for each")
    if per_input and not any(name.startswith("x_test_") for name in per_input):
        raise _fail(DatasetError, f"{source} has per-input arrays but no x_test_<input name>; save "
                    "the test samples of every input")
    unknown = sorted(set(headers) - set(accepted) - per_input)
    if unknown:
        raise _fail(DatasetError, f"{source} has unexpected array(s) {', '.join(unknown)}; name "
                    f"the arrays {', '.join(accepted)}")
    missing = [k for k in REQUIRED_ARRAYS if k not in headers and not per_input]
    if missing:
        raise _fail(DatasetError, f"{source} is missing {' and '.join(missing)}; save the arrays "
                    f"with {_NPZ_EXAMPLE}")
    has_train = "x_train" in headers or any(n.startswith("x_train_") for n in per_input)
    if per_input and has_train != ("y_train" in headers):
        raise _fail(DatasetError, f"{source}: x_train_<input> arrays and y_train go together; add "
                    "the missing one or remove the other")
    if has_train and "y_test" not in headers:
        raise _fail(DatasetError, f"{source} has x_train but no y_test; an unlabelled dataset takes "
                    "x_test and x_calib (calibration samples) only, or add y_test")
    if not per_input and ("x_train" in headers) != ("y_train" in headers):
        have, lack = ("x_train", "y_train") if "x_train" in headers else ("y_train", "x_train")
        raise _fail(DatasetError, f"{source} has {have} but no {lack}; add {lack} or remove {have}")
    arrays: dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            for name in headers:
                arrays[name] = np.asarray(npz[name])
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise _fail(DatasetError, f"{source} could not be read ({_short(exc)}); save the arrays "
                    f"again with {_NPZ_EXAMPLE}") from None

    for name, array in arrays.items():
        _check_numeric(name, array, source)
        if array.ndim == 0 or array.shape[0] == 0:
            raise _fail(DatasetError, f"{source}: array '{name}' is empty; save at least one "
                        "sample")
    for name in [k for k in arrays if k.startswith("x_")]:
        if arrays[name].ndim < 2:
            raise _fail(DatasetError, f"{source}: features '{name}' have shape "
                        f"{arrays[name].shape}; save one sample per row, shape (N, ...)")
    for name in [k for k in arrays if k.startswith("y_")]:
        arrays[name] = _labels(name, arrays[name], source, notes)
    for split in ("test", "train"):
        x, y = arrays.get(f"x_{split}"), arrays.get(f"y_{split}")
        if x is not None and y is not None and len(x) != len(y):
            raise _fail(DatasetError, f"{source}: x_{split} has {len(x)} samples but y_{split} has "
                        f"{len(y)} labels; save one label per sample")
    for split in ("test", "calib", "train"):
        named = {n: a for n, a in arrays.items() if n.startswith(f"x_{split}_")}
        lengths = {len(a) for a in named.values()} | ({len(arrays[f"y_{split}"])} if named and f"y_{split}" in arrays else set())
        if len(lengths) > 1:
            raise _fail(DatasetError, f"{source}: the x_{split}_<input> arrays (and y_{split}) have "
                        f"different lengths {sorted(lengths)}; save one row per sample in each")
    return arrays


@_user_errors(DatasetError)
def validate_dataset_for_model(arrays: dict[str, np.ndarray], input_shape: Iterable[int],
                               num_classes: int, label_output: str | None = None) -> dict[str, np.ndarray]:
    """Check a loaded dataset against a model; return the arrays ready to feed it.

    Each x_* sample must have exactly the model's per-sample input shape. One difference is
    accepted: a missing trailing channel of size 1 (e.g. (N, 28, 28) for a (28, 28, 1) model),
    which is added. Every label must be below `num_classes` (the units of `label_output`, the
    output the labels belong to, when the model has several).
    """
    expected = tuple(int(d) for d in input_shape)
    result = dict(arrays)
    # x_test, then x_train: the user's own, while x_calib may have been drawn from one of them.
    order = {"x_test": 0, "x_train": 1}
    for name in sorted((k for k in arrays if k.startswith("x_")), key=lambda k: (order.get(k, 2), k)):
        found = tuple(arrays[name].shape[1:])
        if found == expected:
            continue
        if expected and expected[-1] == 1 and found == expected[:-1]:
            result[name] = arrays[name][..., np.newaxis]
            continue
        raise _fail(DatasetError, f"{name} has samples of shape {found} but the model expects "
                    f"{expected}; reshape the array to (N, {', '.join(map(str, expected))})")
    for name in sorted(k for k in arrays if k.startswith("y_")):
        labels = arrays[name]
        if labels.size and int(labels.max()) >= num_classes and label_output:
            raise _fail(DatasetError, f"{name} has label {int(labels.max())} but the model's output "
                        f"{label_output!r}, which the labels were matched to, has {num_classes} units "
                        f"(classes 0..{num_classes - 1}); if they belong to another output, choose it "
                        f"as the label output")
        if labels.size and int(labels.max()) >= num_classes:
            raise _fail(DatasetError, f"{name} has label {int(labels.max())} but the model has "
                        f"{num_classes} outputs (classes 0..{num_classes - 1}); use the dataset "
                        "the model was trained on or a model with more outputs")
    return result
