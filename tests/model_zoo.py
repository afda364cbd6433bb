"""Tiny user-style models and datasets of every kind QuantLab meets, built in the test (no binaries).

Each builder saves a model file the way a user would and returns its path; `save_dataset` writes the
.npz a user would upload. Data are small and seeded; the models are untrained unless said otherwise
(quantization and measurement do not need a good model, only a real one).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from quantlab.tfcompat import import_tensorflow

RNG_SEED = 7
CLASSES = 3
SEQ_SHAPE = (12, 4)  # time steps, features
TOKENS, VOCAB = 10, 50


def keras2():
    return import_tensorflow()[1]


def keras3():
    import_tensorflow()
    import keras

    return keras


def train_briefly(model, x, y) -> None:
    k = keras2()
    model.compile(optimizer="adam", loss=k.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, batch_size=32, verbose=0)


def sequences(n: int, seed: int = RNG_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Sequences whose class is the sign pattern of the mean of the first two features."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *SEQ_SHAPE)).astype(np.float32)
    y = (x[:, :, 0].mean(axis=1) > 0).astype(np.int64) + (x[:, :, 1].mean(axis=1) > 0)
    return x, y


def tokens(n: int, seed: int = RNG_SEED) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, VOCAB, size=(n, TOKENS)).astype(np.int32)
    return x, (x[:, 0] % CLASSES).astype(np.int64)


def images(n: int, size: int = 16, seed: int = RNG_SEED) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.random((n, size, size, 1)).astype(np.float32)
    return x, (x[:, : size // 2].mean(axis=(1, 2, 3)) * CLASSES * 0.999).astype(np.int64) % CLASSES


def recurrent_model(kind: str):
    """LSTM or GRU over (12, 4) sequences, 3 classes (tf_keras, functional)."""
    k = keras2()
    layer = {"lstm": k.layers.LSTM, "gru": k.layers.GRU}[kind]
    inputs = k.Input(SEQ_SHAPE)
    outputs = k.layers.Dense(CLASSES)(layer(16, name=kind)(inputs))
    return k.Model(inputs, outputs, name=f"{kind}-classifier")


def embedding_model():
    """int32 token ids -> Embedding -> pooling -> Dense (tf_keras)."""
    k = keras2()
    inputs = k.Input((TOKENS,), dtype="int32")
    x = k.layers.Embedding(VOCAB, 8)(inputs)
    x = k.layers.GlobalAveragePooling1D()(x)
    return k.Model(inputs, k.layers.Dense(CLASSES)(x), name="token-classifier")


def conv1d_model():
    k = keras2()
    return k.Sequential([k.Input(SEQ_SHAPE), k.layers.Conv1D(8, 3, activation="relu"),
                         k.layers.GlobalAveragePooling1D(), k.layers.Dense(CLASSES)], name="conv1d")


def preprocessing_model(x_adapt: np.ndarray):
    """Rescaling and an adapted Normalization in front of a small CNN (tf_keras)."""
    k = keras2()
    norm = k.layers.Normalization()
    norm.adapt(x_adapt)
    return k.Sequential([k.Input(x_adapt.shape[1:]), k.layers.Rescaling(2.0, offset=-1.0), norm,
                         k.layers.Conv2D(8, 3, activation="relu"), k.layers.GlobalAveragePooling2D(),
                         k.layers.Dense(CLASSES)], name="preprocessing")


def mini_xception(size: int = 32, classes: int = CLASSES):
    """The mini-Xception shape (SeparableConv2D, BatchNorm, residual Add), small (tf_keras)."""
    k = keras2()
    L = k.layers
    inputs = k.Input((size, size, 1))
    x = L.Conv2D(8, 3, use_bias=False)(inputs)
    x = L.Activation("relu")(L.BatchNormalization()(x))
    for filters in (16, 32):
        residual = L.BatchNormalization()(L.Conv2D(filters, 1, strides=2, padding="same", use_bias=False)(x))
        x = L.SeparableConv2D(filters, 3, padding="same", use_bias=False)(x)
        x = L.Activation("relu")(L.BatchNormalization()(x))
        x = L.BatchNormalization()(L.SeparableConv2D(filters, 3, padding="same", use_bias=False)(x))
        x = L.MaxPooling2D(3, strides=2, padding="same")(x)
        x = L.Add()([x, residual])
    x = L.GlobalAveragePooling2D()(L.Conv2D(classes, 3, padding="same")(x))
    return k.Model(inputs, L.Activation("softmax")(x), name="mini_xception")


def transformer_model():
    """int32 tokens -> Embedding -> a Transformer encoder block (MultiHeadAttention, residual Add,
    LayerNormalization, a GELU feed-forward) -> pooling -> Dense: a text classifier (tf_keras)."""
    k = keras2()
    L = k.layers
    inputs = k.Input((TOKENS,), dtype="int32")
    embedded = L.Embedding(VOCAB, 16)(inputs)
    attended = L.MultiHeadAttention(num_heads=2, key_dim=8)(embedded, embedded)
    x = L.LayerNormalization()(L.Add()([embedded, attended]))
    forward = L.Dense(16)(L.Dense(32, activation="gelu")(x))
    x = L.LayerNormalization()(L.Add()([x, forward]))
    return k.Model(inputs, L.Dense(CLASSES)(L.GlobalAveragePooling1D()(x)), name="transformer")


def keras_mobilenet_v3(size: int = 32):
    """Keras's own MobileNetV3Small (tf_keras applications, no downloaded weights): a real pretrained
    architecture's graph, with its Rescaling, hard-swish as TF ops and squeeze-excite blocks."""
    k = keras2()
    k.backend.clear_session()  # its layer names, as in a user's fresh process
    return k.applications.MobileNetV3Small(input_shape=(size, size, 3), weights=None, classes=CLASSES)


def rgb_images(n: int, size: int = 32, seed: int = RNG_SEED) -> tuple[np.ndarray, np.ndarray]:
    """0-255 RGB images (what MobileNetV3's built-in Rescaling expects); class from the red mean."""
    rng = np.random.default_rng(seed)
    x = (rng.random((n, size, size, 3)) * 255).astype(np.float32)
    return x, (x[..., 0].mean(axis=(1, 2)) / 255 * CLASSES * 0.999).astype(np.int64) % CLASSES


def transfer_model(keras=None, input_shape=(16, 16, 1)):
    """Transfer learning as users write it: a Functional backbone (conv, batch norm, residual Add)
    called with `training=False` inside a classifier, one of its layers named like the head's."""
    k = keras or keras2()
    L = k.layers
    inputs = k.Input(input_shape)
    x = L.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = L.Activation("relu")(L.BatchNormalization()(x))
    x = L.Add()([x, L.Conv2D(8, 3, padding="same", name="head")(inputs)])
    backbone = k.Model(inputs, x, name="backbone")
    outer = k.Input(input_shape)
    features = L.GlobalAveragePooling2D()(backbone(outer, training=False))
    return k.Model(outer, L.Dense(CLASSES, name="head")(features), name="classifier")


def mixed_precision_model(keras=None, policy: str = "mixed_float16"):
    """A CNN built under a mixed-precision policy (float16 compute, float32 variables), as GPU
    training saves it; its last layer computes in float32, as Keras's guide says."""
    k = keras or keras2()
    k.mixed_precision.set_global_policy(policy)
    try:
        return k.Sequential([k.Input((16, 16, 1)), k.layers.Conv2D(8, 3, activation="relu"),
                             k.layers.Flatten(), k.layers.Dense(CLASSES, dtype="float32")])
    finally:
        k.mixed_precision.set_global_policy("float32")


def group_norm_model():
    """Conv2D -> GroupNormalization -> DepthwiseConv2D: a dynamic batch makes LiteRT's BROADCAST_TO fail."""
    k = keras2()
    L = k.layers
    return k.Sequential([k.Input((16, 16, 1)), L.Conv2D(8, 3), L.GroupNormalization(groups=4),
                         L.DepthwiseConv2D(3), L.ReLU(), L.GlobalAveragePooling2D(), L.Dense(CLASSES)])


def masked_lstm_model():
    """Padded token ids -> Embedding(mask_zero=True) -> LSTM: the mask keeps the LSTM from fusing."""
    k = keras2()
    return k.Sequential([k.Input((TOKENS,), dtype="int32"), k.layers.Embedding(VOCAB, 8, mask_zero=True),
                         k.layers.LSTM(8), k.layers.Dense(CLASSES)])


def padded_tokens(n: int, seed: int = RNG_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Token ids with a zero padding tail of random length (at least 3 real tokens)."""
    x, y = tokens(n, seed)
    x = np.where(x == 0, 1, x)
    lengths = np.random.default_rng(seed + 1).integers(3, TOKENS + 1, size=n)
    x[np.arange(TOKENS)[None, :] >= lengths[:, None]] = 0
    return x, y


def keras3_model(functional: bool, input_shape=(16, 16, 1)):
    """A Keras 3 CNN, Sequential or Functional (what model.save('m.keras') writes on TF 2.16+)."""
    k = keras3()
    if not functional:
        return k.Sequential([k.Input(input_shape), k.layers.Conv2D(8, 3, activation="relu"),
                             k.layers.MaxPooling2D(), k.layers.Flatten(), k.layers.Dense(CLASSES)])
    inputs = k.Input(input_shape)
    x = k.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = k.layers.Add()([x, k.layers.Conv2D(8, 1)(inputs)])
    x = k.layers.GlobalAveragePooling2D()(x)
    return k.Model(inputs, k.layers.Dense(CLASSES)(x))


def save_h5(model, folder: Path, name: str) -> Path:
    path = folder / f"{name}.h5"
    model.save(path)
    return path


def save_keras(model, folder: Path, name: str) -> Path:
    path = folder / f"{name}.keras"
    model.save(path)
    return path


def save_saved_model_zip(model, folder: Path, name: str) -> Path:
    """A plain SavedModel (tf.saved_model.save of a tf_keras model's function), zipped."""
    import shutil

    tf = import_tensorflow()[0]
    export = folder / f"{name}-savedmodel"
    spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32, name="x")
    module = tf.Module()
    module.model = model
    module.serve = tf.function(lambda x: {"scores": model(x, training=False)}, input_signature=[spec])
    tf.saved_model.save(module, str(export), signatures={"serving_default": module.serve})
    return Path(shutil.make_archive(str(folder / name), "zip", root_dir=export))


def save_dataset(folder: Path, name: str, x_test, y_test=None, *, x_train=None, y_train=None,
                 x_calib=None) -> Path:
    arrays = {"x_test": x_test}
    for key, value in (("y_test", y_test), ("x_train", x_train), ("y_train", y_train), ("x_calib", x_calib)):
        if value is not None:
            arrays[key] = value
    path = folder / f"{name}.npz"
    np.savez(path, **arrays)
    return path


def one_hot(y: np.ndarray, classes: int = CLASSES) -> np.ndarray:
    return np.eye(classes, dtype=np.float32)[y]


def two_input_two_output_model():
    """Features and int32 tokens in; a 3-class head and a 2-unit auxiliary head out (tf_keras)."""
    k = keras2()
    features = k.Input((8,), name="features")
    tokens_in = k.Input((TOKENS,), dtype="int32", name="tokens")
    pooled = k.layers.GlobalAveragePooling1D()(k.layers.Embedding(VOCAB, 4)(tokens_in))
    hidden = k.layers.Concatenate()([k.layers.Dense(12, activation="relu")(features), pooled])
    return k.Model([features, tokens_in], [k.layers.Dense(CLASSES, name="label_head")(hidden),
                                           k.layers.Dense(2, name="aux_head")(hidden)])


def two_input_arrays(n: int, seed: int = RNG_SEED) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"features": rng.normal(size=(n, 8)).astype(np.float32),
            "tokens": rng.integers(0, VOCAB, size=(n, TOKENS)).astype(np.int32)}


def save_multi_input_dataset(folder: Path, name: str, n_test: int = 80, n_calib: int = 40,
                             labels: bool = True, n_train: int = 0) -> Path:
    """x_test_<input> and x_calib_<input> for each input of two_input_two_output_model, y_test (and,
    with n_train, x_train_<input> and y_train)."""
    test, calib = two_input_arrays(n_test, seed=3), two_input_arrays(n_calib, seed=4)
    arrays = {f"x_test_{k}": v for k, v in test.items()} | {f"x_calib_{k}": v for k, v in calib.items()}
    if labels:
        arrays["y_test"] = (test["tokens"][:, 0] % CLASSES).astype(np.int64)
    if labels and n_train:
        train = two_input_arrays(n_train, seed=5)
        arrays |= {f"x_train_{k}": v for k, v in train.items()}
        arrays["y_train"] = (train["tokens"][:, 0] % CLASSES).astype(np.int64)
    path = folder / f"{name}.npz"
    np.savez(path, **arrays)
    return path
