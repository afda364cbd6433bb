"""The one place TensorFlow is imported, with the legacy Keras (tf_keras) that tfmot needs."""

from __future__ import annotations

import os
from types import ModuleType


def import_tensorflow() -> tuple[ModuleType, ModuleType]:
    """Return (tensorflow, tf_keras), making TensorFlow use tf_keras (Keras 2) as `tf.keras`.

    TensorFlow 2.16+ ships Keras 3, which tensorflow-model-optimization cannot wrap; the variable must
    be set before TensorFlow is first imported.
    """
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import tf_keras

    return tf, tf_keras


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape conversions and measurements (no TensorFlow import)."""
    from importlib import metadata

    versions = {}
    for name in ("tensorflow-cpu", "tensorflow", "tf-keras", "tensorflow-model-optimization",
                 "ai-edge-litert", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
