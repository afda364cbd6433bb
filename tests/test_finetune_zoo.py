"""Fine-tuning the architectures users bring (quantlab/finetune.py on a zoo of tiny models built here).

Each model kind is fine-tuned for a couple of steps on random data, converted to TFLite for real, and
its structure is asserted: int8 kernels for the quantization-aware trained layers, the target sparsity
on the pruned weights, at most k values in the clustered ones, and the stats' optimized / untouched
layer lists. Techniques that cannot apply must refuse, naming the layer, before any fine-tuning.
Passes with oneDNN on or off (TF_ENABLE_ONEDNN_OPTS=0); the reported mini-Xception `fit` segfault
with oneDNN on was on a 64x64 model and did not reproduce on this 32x32 one.
"""

from __future__ import annotations

import numpy as np
import pytest

from quantlab import finetune as ft
from quantlab.errors import ModelError
from quantlab.tfcompat import import_tensorflow

tf, keras = import_tensorflow()
import tensorflow_model_optimization as tfmot  # noqa: E402  (after import_tensorflow)
from ai_edge_litert.interpreter import Interpreter  # noqa: E402

L = keras.layers
SAMPLES, BATCH = 16, 8  # two fine-tune steps per epoch
CLUSTERS = 4
SPARSITY = 0.5
FIT = {"batch_size": BATCH}


# --- the zoo ----------------------------------------------------------------------------------


def build_conv1d() -> keras.Model:
    inputs = keras.Input((32, 3))
    x = L.Conv1D(8, 3, activation="relu", name="conv_a")(inputs)
    x = L.MaxPooling1D(2, name="pool")(x)
    x = L.Conv1D(8, 3, activation="relu", name="conv_b")(x)
    x = L.GlobalAveragePooling1D(name="gap")(x)
    return keras.Model(inputs, L.Dense(4, name="head")(x))


def build_preprocessing() -> keras.Model:
    inputs = keras.Input((12, 12, 3))
    x = L.Rescaling(1 / 255.0, name="rescale")(inputs)
    normalize = L.Normalization(name="normalize")
    normalize.adapt(np.random.default_rng(0).random((16, 12, 12, 3), np.float32))
    x = normalize(x)
    x = L.Conv2D(8, 3, activation="relu", name="conv")(x)
    x = L.Flatten(name="flatten")(x)
    return keras.Model(inputs, L.Dense(4, name="head")(x))


def build_embedding() -> keras.Model:
    inputs = keras.Input((10,), dtype="int32")
    x = L.Embedding(50, 8, name="embed")(inputs)
    x = L.GlobalAveragePooling1D(name="gap")(x)
    x = L.Dense(8, activation="relu", name="hidden")(x)
    return keras.Model(inputs, L.Dense(4, name="head")(x))


def build_lstm() -> keras.Model:
    inputs = keras.Input((10, 4))
    return keras.Model(inputs, L.Dense(4, name="head")(L.LSTM(8, name="lstm")(inputs)))


def build_gru() -> keras.Model:
    inputs = keras.Input((10, 4))
    return keras.Model(inputs, L.Dense(4, name="head")(L.GRU(8, name="gru")(inputs)))


def build_mini_xception(size: int = 32, filters: int = 8, classes: int = 7) -> keras.Model:
    """oarriaga's mini-Xception shape, tiny: stem, then SeparableConv2D blocks with a residual 1x1."""
    inputs = keras.Input((size, size, 1))
    x = inputs
    for _ in range(2):
        x = L.Conv2D(filters, 3, use_bias=False)(x)
        x = L.BatchNormalization()(x)
        x = L.Activation("relu")(x)
    for block_filters in (2 * filters, 4 * filters):
        residual = L.Conv2D(block_filters, 1, strides=2, padding="same", use_bias=False)(x)
        residual = L.BatchNormalization()(residual)
        x = L.SeparableConv2D(block_filters, 3, padding="same", use_bias=False)(x)
        x = L.BatchNormalization()(x)
        x = L.Activation("relu")(x)
        x = L.SeparableConv2D(block_filters, 3, padding="same", use_bias=False)(x)
        x = L.BatchNormalization()(x)
        x = L.MaxPooling2D(3, strides=2, padding="same")(x)
        x = L.add([x, residual])
    x = L.Conv2D(classes, 3, padding="same")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Activation("softmax")(x))


def load_fresh(path) -> keras.Model:
    """Load a .h5 as a fresh process would: Keras's automatic layer-name counters start at zero."""
    keras.backend.clear_session()
    return keras.models.load_model(path, compile=False)


def data_for(model: keras.Model, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (SAMPLES, *model.input_shape[1:])
    if model.inputs[0].dtype.is_integer:
        x = rng.integers(0, 50, shape).astype(np.int32)
    else:
        x = rng.random(shape, np.float32)
    return x, rng.integers(0, model.output_shape[-1], SAMPLES)


# --- helpers ------------------------------------------------------------------------------------


def to_tflite(model: keras.Model, optimize: bool = False) -> bytes:
    """Convert through a concrete function with batch 1 (recurrent layers need a fixed batch)."""
    spec = tf.TensorSpec([1, *model.input_shape[1:]], model.inputs[0].dtype)
    function = tf.function(lambda x: model(x)).get_concrete_function(spec)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function], model)
    if optimize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return converter.convert()


def tflite_tensors(tflite: bytes) -> list[tuple[tuple[int, ...], np.dtype]]:
    interpreter = Interpreter(model_content=tflite)
    return [(tuple(int(d) for d in t["shape"]), np.dtype(t["dtype"])) for t in interpreter.get_tensor_details()]


def shape_key(shape) -> tuple[int, ...]:
    """Dimensions without the 1s, sorted: a Keras kernel and its TFLite tensor share it."""
    return tuple(sorted(int(d) for d in shape if d != 1))


def assert_int8_kernels(tflite: bytes, model: keras.Model, layers: list[str]) -> None:
    """Every kernel of `layers` (baseline names) is an int8 tensor in the converted model."""
    int8 = {shape_key(shape) for shape, dtype in tflite_tensors(tflite) if dtype == np.int8}
    by_name = {layer.name: layer for layer in model.layers}
    checked = 0
    for name in layers:
        for weight in by_name[name].weights:
            if ft._short_name(weight) in ft.KERNEL_WEIGHT_NAMES:
                assert shape_key(weight.shape) in int8, (name, weight.name, weight.shape)
                checked += 1
    assert checked, layers


def weight_values(model: keras.Model, layer: str, short: str) -> np.ndarray:
    """The one weight named `short` ("kernel", "recurrent_kernel"...) of `layer`, read directly."""
    found = [w.numpy() for w in model.get_layer(layer).weights if ft._short_name(w) == short]
    assert len(found) == 1, (layer, short, [w.name for w in model.get_layer(layer).weights])
    return found[0]


def assert_sparse(model: keras.Model, optimized: list[dict]) -> None:
    """Each pruned weight holds the target share of zeros."""
    for entry in optimized:
        for short in entry["weights"]:
            zeros = np.mean(weight_values(model, entry["layer"], short) == 0)
            assert zeros >= SPARSITY - 0.01, (entry["layer"], short, zeros)


def assert_clustered(model: keras.Model, optimized: list[dict]) -> None:
    """Each clustered weight holds at most CLUSTERS distinct values."""
    for entry in optimized:
        for short in entry["weights"]:
            unique = np.unique(weight_values(model, entry["layer"], short)).size
            assert unique <= CLUSTERS, (entry["layer"], short, unique)


def names(entries: list[dict]) -> list[str]:
    return [entry["layer"] for entry in entries]


def reasons(entries: list[dict]) -> dict[str, str]:
    return {entry["layer"]: entry["reason"] for entry in entries}


def prune(model, x, y, **kw):
    return ft.prune(model, x, y, target_sparsity=SPARSITY, epochs=1, **FIT, **kw)


def cluster(model, x, y, **kw):
    return ft.cluster(model, x, y, number_of_clusters=CLUSTERS, **FIT, **kw)


def refuse(call, model, x, y, expected: str) -> None:
    """The technique refuses in one line naming the layer, and nothing was fine-tuned first."""
    events = []
    with pytest.raises(ModelError, match=expected) as error:
        call(model, x, y, on_progress=events.append, **FIT)
    assert "\n" not in str(error.value) and events == []


# --- Conv1D -------------------------------------------------------------------------------------


def test_conv1d_qat_quantizes_every_layer_to_int8_kernels():
    model = build_conv1d()
    x, y = data_for(model)
    result = ft.quantization_aware_train(model, x, y, **FIT)
    assert names(result.stats["optimized_layers"]) == ["conv_a", "pool", "conv_b", "gap", "head"]
    assert result.stats["untouched_layers"] == []
    assert "quant_conv_a" in result.stats["quantized_layers"]
    assert_int8_kernels(to_tflite(result.model, optimize=True), model, ["conv_a", "conv_b", "head"])


def test_conv1d_prune_cluster_and_pqat():
    model = build_conv1d()
    x, y = data_for(model)
    pruned = prune(model, x, y)
    assert names(pruned.stats["optimized_layers"]) == ["conv_a", "conv_b", "head"]
    assert reasons(pruned.stats["untouched_layers"]) == {"pool": "no trainable weights",
                                                        "gap": "no trainable weights"}
    assert_sparse(pruned.model, pruned.stats["optimized_layers"])
    to_tflite(pruned.model)

    clustered = cluster(model, x, y)
    assert names(clustered.stats["optimized_layers"]) == ["conv_a", "conv_b", "head"]
    assert_clustered(clustered.model, clustered.stats["optimized_layers"])
    to_tflite(clustered.model)

    # Sparsity-preserving QAT has no Conv1D quantizer: the pruned Conv1D layers stay float, frozen.
    pqat = ft.pruning_preserving_qat(model, x, y, prune_epochs=1, **FIT)
    assert names(pqat.stats["optimized_layers"]) == ["pool", "gap", "head"]
    assert set(reasons(pqat.stats["untouched_layers"])) == {"conv_a", "conv_b"}
    assert all("frozen" in r for r in reasons(pqat.stats["untouched_layers"]).values())
    assert pqat.stats["sparsity"]["overall"] >= SPARSITY - 0.01  # the frozen float layers kept their zeros
    assert_int8_kernels(to_tflite(pqat.model, optimize=True), model, ["head"])


# --- Rescaling + Normalization ------------------------------------------------------------------


def test_preprocessing_layers_stay_float_and_the_rest_is_int8():
    model = build_preprocessing()
    x, y = data_for(model)
    x = x * 255
    result = ft.quantization_aware_train(model, x, y, **FIT)
    rescale, normalize = result.stats["untouched_layers"]
    assert rescale == {"layer": "rescale", "class": "Rescaling", "reason": ft.PREPROCESSING_REASON}
    # The last float layer before the convolution gets its output fake-quantized (an input range).
    assert normalize["layer"] == "normalize" and normalize["output_quantized"] is True
    assert normalize["reason"].startswith(ft.PREPROCESSING_REASON)
    assert names(result.stats["optimized_layers"]) == ["conv", "flatten", "head"]
    tflite = to_tflite(result.model, optimize=True)
    assert_int8_kernels(tflite, model, ["conv", "head"])
    # The float preprocessing still runs in the converted model: its output matches the Keras model's.
    interpreter = Interpreter(model_content=tflite)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.set_tensor(inp["index"], x[:1])
    interpreter.invoke()
    expected = result.model(x[:1]).numpy()
    assert np.abs(interpreter.get_tensor(out["index"]) - expected).max() <= 0.1 * np.abs(expected).max() + 1e-3


def test_preprocessing_model_prunes_clusters_and_cqat():
    model = build_preprocessing()
    x, y = data_for(model)
    pruned = prune(model, x, y)
    assert names(pruned.stats["optimized_layers"]) == ["conv", "head"]
    assert {"rescale", "normalize"} <= set(reasons(pruned.stats["untouched_layers"]))
    assert_sparse(pruned.model, pruned.stats["optimized_layers"])
    to_tflite(pruned.model)

    cqat = ft.cluster_preserving_qat(model, x, y, number_of_clusters=CLUSTERS, **FIT)
    assert names(cqat.stats["optimized_layers"]) == ["conv", "flatten", "head"]
    assert max(cqat.stats["unique_values_per_channel"].values()) <= CLUSTERS
    assert_int8_kernels(to_tflite(cqat.model, optimize=True), model, ["conv", "head"])


# --- Embedding with int32 token ids -------------------------------------------------------------


def test_embedding_stays_float_in_qat_and_is_pruned_and_clustered():
    model = build_embedding()
    x, y = data_for(model)
    qat = ft.quantization_aware_train(model, x, y, **FIT)
    assert names(qat.stats["untouched_layers"]) == ["embed"]
    assert "Embedding" in qat.stats["untouched_layers"][0]["reason"]
    assert names(qat.stats["optimized_layers"]) == ["gap", "hidden", "head"]
    assert_int8_kernels(to_tflite(qat.model, optimize=True), model, ["hidden", "head"])

    pruned = prune(model, x, y)
    assert pruned.stats["optimized_layers"][0] == {"layer": "embed", "class": "Embedding",
                                                   "weights": ["embeddings"]}
    assert_sparse(pruned.model, pruned.stats["optimized_layers"])
    to_tflite(pruned.model)

    pqat = ft.pruning_preserving_qat(model, x, y, prune_epochs=1, **FIT)
    assert "frozen" in reasons(pqat.stats["untouched_layers"])["embed"]
    assert pqat.stats["sparsity"]["layers"]["embed"]["sparsity"] >= SPARSITY - 0.01
    to_tflite(pqat.model, optimize=True)


def test_a_model_with_no_quantizable_weights_is_refused():
    inputs = keras.Input((10,), dtype="int32")
    model = keras.Model(inputs, L.GlobalMaxPooling1D(name="pool")(L.Embedding(50, 4, name="embed")(inputs)))
    x, y = data_for(model)
    refuse(ft.quantization_aware_train, model, x, y, r"qat-int8: no layer of this model with weights.*"
           r"embed \(Embedding\).*int8-fallback or dynamic")


# --- recurrent ----------------------------------------------------------------------------------


@pytest.mark.parametrize("build, layer, kind", [(build_lstm, "lstm", "LSTM"), (build_gru, "gru", "GRU")])
def test_recurrent_models_prune_and_cluster_and_refuse_qat(build, layer, kind):
    model = build()
    x, y = data_for(model)
    for technique, call in (("qat-int8", ft.quantization_aware_train), ("cqat-int8", ft.cluster_preserving_qat),
                            ("pqat-int8", ft.pruning_preserving_qat)):
        refuse(call, model, x, y, f"{technique}: layer '{layer}' \\({kind}\\) has no quantization-aware "
                                  f"training in tfmot 0.8.1; use int8-fallback or dynamic")

    pruned = prune(model, x, y)
    assert pruned.stats["optimized_layers"][0] == {"layer": layer, "class": kind,
                                                   "weights": ["kernel", "recurrent_kernel"]}
    assert pruned.stats["untouched_layers"] == []
    assert_sparse(pruned.model, pruned.stats["optimized_layers"])
    to_tflite(pruned.model)

    clustered = cluster(model, x, y)
    assert names(clustered.stats["optimized_layers"]) == [layer, "head"]
    assert_clustered(clustered.model, clustered.stats["optimized_layers"])
    to_tflite(clustered.model)


def test_lstm_sparsity_preserving_clustering():
    model = build_lstm()
    x, y = data_for(model)
    result = ft.sparsity_preserving_cluster(model, x, y, prune_epochs=1, number_of_clusters=CLUSTERS, **FIT)
    assert_sparse(result.model, result.stats["stages"]["prune"]["optimized_layers"])
    assert_clustered(result.model, result.stats["optimized_layers"])
    to_tflite(result.model)


def test_sparsity_preserving_clustering_leaves_a_kernel_too_small_to_cluster_pruned_and_frozen():
    # Dense(8 -> 4) has 32 weights, half of them zero after pruning: fewer than 2 x 16 clusters.
    model = build_embedding()
    x, y = data_for(model)
    result = ft.sparsity_preserving_cluster(model, x, y, prune_epochs=1, number_of_clusters=16, **FIT)
    untouched = reasons(result.stats["untouched_layers"])
    assert "fewer than the 32" in untouched["head"] and "frozen so its zeros survive" in untouched["head"]
    assert "head" in names(result.stats["stages"]["prune"]["optimized_layers"])
    assert_sparse(result.model, result.stats["stages"]["prune"]["optimized_layers"])
    to_tflite(result.model)


# --- mini-Xception loaded from .h5 -------------------------------------------------------------


@pytest.fixture(scope="module")
def xception_h5(tmp_path_factory):
    path = tmp_path_factory.mktemp("zoo") / "mini_xception.h5"
    keras.backend.clear_session()  # built as in a user's fresh process: its first Conv2D is "conv2d"
    build_mini_xception().save(path)
    return path


def test_raw_tfmot_miswires_a_freshly_loaded_mini_xception(xception_h5):
    """The cause: tfmot's SeparableConv2D transform names its new 1x1 Conv2D automatically
    ("conv2d" in a fresh process), the loaded model already has a "conv2d", and tfmot's
    ModelTransformer wires layers by name."""
    model = load_fresh(xception_h5)
    assert keras.layers.Conv2D(1, 1).name == "conv2d" and "conv2d" in [layer.name for layer in model.layers]
    model = load_fresh(xception_h5)
    with pytest.raises(ValueError, match="incompatible shapes"):
        tfmot.quantization.keras.quantize_model(model)


def test_mini_xception_qat_prune_cluster_and_pqat(xception_h5):
    model = load_fresh(xception_h5)
    x, y = data_for(model)
    kernels = [layer.name for layer in model.layers if layer.trainable_weights
               and not isinstance(layer, L.BatchNormalization)]
    qat = ft.quantization_aware_train(model, x, y, **FIT)
    assert qat.stats["untouched_layers"] == []
    assert "batch_normalization" in names(qat.stats["optimized_layers"])  # folded into its convolution
    assert_int8_kernels(to_tflite(qat.model, optimize=True), model, kernels)

    pruned = prune(model, x, y)
    assert names(pruned.stats["optimized_layers"]) == kernels
    separable = [e for e in pruned.stats["optimized_layers"] if e["class"] == "SeparableConv2D"]
    assert separable and all(e["weights"] == ["pointwise_kernel"] for e in separable)
    assert_sparse(pruned.model, pruned.stats["optimized_layers"])
    to_tflite(pruned.model)

    clustered = cluster(model, x, y)
    assert names(clustered.stats["optimized_layers"]) == kernels
    assert_clustered(clustered.model, clustered.stats["optimized_layers"])

    pqat = ft.pruning_preserving_qat(model, x, y, prune_epochs=1, **FIT)
    # Measured on the QAT model, where each SeparableConv2D's pointwise kernel is a new 1x1 Conv2D.
    assert len(pqat.stats["sparsity"]["layers"]) == len(kernels)
    assert pqat.stats["sparsity"]["overall"] >= SPARSITY - 0.01
    assert_int8_kernels(to_tflite(pqat.model, optimize=True), model, kernels)

    # tfmot wraps BatchNormalization for clustering without clustering it: frozen all the same.
    both = ft.sparsity_preserving_cluster(model, x, y, prune_epochs=1, number_of_clusters=CLUSTERS, **FIT)
    assert_sparse(both.model, both.stats["stages"]["prune"]["optimized_layers"])
    to_tflite(both.model)


# --- attention and Keras's own applications -----------------------------------------------------


def build_transformer_encoder() -> keras.Model:
    """A text classifier's encoder block: tokens, Embedding, MultiHeadAttention, residual Add,
    LayerNormalization, a GELU feed-forward."""
    inputs = keras.Input((10,), dtype="int32")
    embedded = L.Embedding(50, 16, name="embed")(inputs)
    attended = L.MultiHeadAttention(num_heads=2, key_dim=8, name="attention")(embedded, embedded)
    x = L.LayerNormalization(name="norm_a")(L.Add(name="residual_a")([embedded, attended]))
    forward = L.Dense(16, name="ff_out")(L.Dense(32, activation="gelu", name="ff_in")(x))
    x = L.LayerNormalization(name="norm_b")(L.Add(name="residual_b")([x, forward]))
    return keras.Model(inputs, L.Dense(4, name="head")(L.GlobalAveragePooling1D(name="gap")(x)))


def test_attention_stays_float_in_qat_and_the_dense_layers_are_int8():
    """tfmot has no quantize config for MultiHeadAttention, and its QuantizeWrapper cannot wrap it
    even for its output (it asks for an output shape from one input shape): it stays float, unwrapped."""
    model = build_transformer_encoder()
    x, y = data_for(model)
    qat = ft.quantization_aware_train(model, x, y, **FIT)
    untouched = reasons(qat.stats["untouched_layers"])
    assert "no quantize config for MultiHeadAttention" in untouched["attention"]
    assert "output is quantized" not in untouched["attention"]
    assert {"ff_in", "ff_out", "head"} <= set(names(qat.stats["optimized_layers"]))
    assert_int8_kernels(to_tflite(qat.model, optimize=True), model, ["ff_in", "ff_out", "head"])


def test_cluster_preserving_qat_copies_attention_weights_by_name():
    """strip_clustering rebuilds MultiHeadAttention with its kernels first, then its biases; the copy
    QAT starts from must still give each weight its own value."""
    model = build_transformer_encoder()
    x, y = data_for(model)
    cqat = ft.cluster_preserving_qat(model, x, y, number_of_clusters=CLUSTERS, **FIT)
    assert "attention" in names(cqat.stats["untouched_layers"])
    assert_int8_kernels(to_tflite(cqat.model, optimize=True), model, ["ff_in", "ff_out", "head"])


def test_keras_mobilenet_v3_small_is_quantization_aware_trained():
    """Keras's own MobileNetV3Small (as a user's fine-tuned copy would be, without downloaded weights):
    its hard-swish is TF ops (TFOpLambda: x + 3, x * 1/6) that tfmot cannot wrap even for their
    output; they stay float and the convolutions are int8."""
    keras.backend.clear_session()
    model = keras.applications.MobileNetV3Small(input_shape=(32, 32, 3), weights=None, classes=4)
    x, y = data_for(model)
    qat = ft.quantization_aware_train(model, x, y, **FIT)
    untouched = {e["layer"]: e for e in qat.stats["untouched_layers"]}
    lambdas = [e for e in untouched.values() if e["class"] == "TFOpLambda"]
    assert lambdas and not any(e.get("output_quantized") for e in lambdas)
    convolutions = [layer.name for layer in model.layers if isinstance(layer, L.Conv2D)
                    and not isinstance(layer, L.DepthwiseConv2D) and "squeeze_excite" not in layer.name]
    assert set(convolutions) <= set(names(qat.stats["optimized_layers"]))
    assert_int8_kernels(to_tflite(qat.model, optimize=True), model, convolutions[:4])


def build_squeeze_excite() -> keras.Model:
    """A MobileNetV3-style block: conv + batch norm, then squeeze-excite, whose first 1x1 conv feeds a
    ReLU directly (no batch norm between), the pattern tfmot fuses and wraps without a weight quantizer."""
    inputs = keras.Input((8, 8, 3))
    x = L.ReLU(name="stem_relu")(L.BatchNormalization(name="stem_bn")(L.Conv2D(8, 3, padding="same", name="stem")(inputs)))
    squeezed = L.GlobalAveragePooling2D(keepdims=True, name="squeeze")(x)
    squeezed = L.ReLU(name="se_relu")(L.Conv2D(8, 1, name="se_reduce")(squeezed))
    squeezed = L.Activation("sigmoid", name="se_gate")(L.Conv2D(8, 1, name="se_expand")(squeezed))
    x = L.Multiply(name="excite")([x, squeezed])
    return keras.Model(inputs, L.Dense(4, name="head")(L.Flatten(name="flatten")(x)))


@pytest.mark.parametrize("technique", ["cqat-int8", "pqat-int8"])
def test_a_conv_fused_with_its_relu_keeps_its_clusters_and_zeros_through_collaborative_qat(technique):
    """tfmot gives a Conv2D followed directly by a ReLU no weight quantizer, so its collaborative scheme
    never preserved that kernel: MobileNetV3Small's squeeze-excite convs ended CQAT with 96-573 values
    per channel (against 16) and PQAT with 0-15% zeros (against 50%). The kernel is held instead."""
    model = build_squeeze_excite()
    x, y = data_for(model)
    if technique == "cqat-int8":
        result = ft.cluster_preserving_qat(model, x, y, number_of_clusters=CLUSTERS, **FIT)
        per_channel = ft.count_unique_weights(result.model, ["se_reduce"], per_channel=True)["se_reduce"]
        assert per_channel <= CLUSTERS
    else:
        result = ft.pruning_preserving_qat(model, x, y, target_sparsity=SPARSITY, prune_epochs=1, **FIT)
        zeros = ft.measure_sparsity(result.model, ["se_reduce"])["layers"]["se_reduce"]["sparsity"]
        assert zeros >= SPARSITY - 0.01
    held = reasons(e for e in result.stats["optimized_layers"] if e.get("reason"))
    assert list(held) == ["se_reduce"] and "held (not trained) during QAT" in held["se_reduce"]
    assert_int8_kernels(to_tflite(result.model, optimize=True), model, ["stem", "se_reduce", "se_expand"])
