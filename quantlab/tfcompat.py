"""The one place TensorFlow is imported, with the legacy Keras (tf_keras) that tfmot needs."""

from __future__ import annotations

import os
from types import ModuleType


ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"


def import_tensorflow() -> tuple[ModuleType, ModuleType]:
    """Return (tensorflow, tf_keras), making TensorFlow use tf_keras (Keras 2) as `tf.keras`.

    TensorFlow 2.16+ ships Keras 3, which tensorflow-model-optimization cannot wrap; the variable must
    be set before TensorFlow is first imported.
    """
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # oneDNN off: with it on, `fit` segfaulted on a real pretrained mini-Xception (SeparableConv2D,
    # BatchNorm, residual Add); off, fine-tunes took as long (within this machine's noise) and the
    # Keras baseline ran faster (0.32-0.35 ms vs 0.57 ms at batch 1 on the seed CNN). TFLite and
    # LiteRT do not use it. Set TF_ENABLE_ONEDNN_OPTS=1 before starting QuantLab to turn it on.
    os.environ.setdefault(ONEDNN_ENV, "0")
    import tensorflow as tf
    import tf_keras

    return tf, tf_keras


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape conversions and measurements (no TensorFlow import)."""
    from importlib import metadata

    versions = {}
    for name in ("tensorflow-cpu", "tensorflow", "tf-keras", "tensorflow-model-optimization",
                 "ai-edge-litert", "litert-quantizer", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    versions["onednn"] = "on" if os.environ.get(ONEDNN_ENV, "0") not in ("0", "false") else "off"
    return versions


def import_for_tasks() -> None:
    """What a worker imports before its first task: TensorFlow, and Keras 3, which TFLiteConverter
    imports at its first conversion to tell a Keras 3 model from a tf_keras one (about 1 s, most of
    it scikit-learn, which Keras 3 imports)."""
    import_tensorflow()
    try:
        import keras  # noqa: F401
    except ImportError:  # no Keras 3 installed: the converter's check fails as fast
        pass
