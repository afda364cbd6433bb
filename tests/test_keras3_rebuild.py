"""Keras 3 models rebuilt as tf_keras models: config translation, weights, outputs, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from quantlab.errors import ModelError
from quantlab.tfcompat import import_tensorflow

tf, tf_keras = import_tensorflow()
import keras  # noqa: E402  (Keras 3, after TF_USE_LEGACY_KERAS=1 is set)

from quantlab import keras3_rebuild  # noqa: E402
from quantlab.keras3_rebuild import rebuild_in_tf_keras, translate_config  # noqa: E402

L = keras.layers
BATCH = 5
VOCAB = 20


# --------------------------------------------------------------------------------------------------
# The zoo: tiny Keras 3 models, each with every weight set to a distinct random value
# --------------------------------------------------------------------------------------------------


def build_mlp():
    return keras.Sequential([keras.Input((8,)), L.Dense(6, activation="relu"), L.Dropout(0.3),
                             L.Dense(3, activation="softmax")], name="mlp")


def build_cnn():
    return keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(4, 3, padding="same"),
                             L.BatchNormalization(), L.ReLU(), L.MaxPooling2D(), L.Flatten(),
                             L.Dense(3)], name="cnn")


def build_residual():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(3, 3, padding="same", kernel_regularizer=keras.regularizers.L2(1e-4))(inputs)
    x = L.BatchNormalization()(x)
    x = L.Add()([x, inputs])
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(3)(x), name="residual")


def build_separable():
    return keras.Sequential([keras.Input((8, 8, 2)), L.SeparableConv2D(4, 3, depth_multiplier=2),
                             L.DepthwiseConv2D(3, activation="relu"), L.GlobalMaxPooling2D(),
                             L.Dense(3)], name="separable")


def build_conv1d():
    return keras.Sequential([keras.Input((10, 2)), L.Conv1D(4, 3, activation="relu"),
                             L.MaxPooling1D(2), L.GlobalAveragePooling1D(), L.Dense(3)],
                            name="conv1d")


def build_recurrent():
    return keras.Sequential([keras.Input((5, 3)), L.LSTM(4, return_sequences=True, seed=7),
                             L.GRU(4, reset_after=False, return_sequences=True),
                             L.Bidirectional(L.LSTM(2, return_sequences=True)), L.GRU(4),
                             L.Dense(3)], name="recurrent")


def build_embedding():
    return keras.Sequential([keras.Input((6,), dtype="int32"), L.Embedding(VOCAB, 4),
                             L.GlobalAveragePooling1D(), L.Dense(3)], name="embedding")


def build_preprocessing():
    normalization = L.Normalization()
    normalization.adapt(np.linspace(0.0, 40.0, 40, dtype="float32").reshape(10, 4) ** 1.5)
    return keras.Sequential([keras.Input((4,)), L.Rescaling(1 / 255.0, offset=0.5), normalization,
                             L.LayerNormalization(), L.Dense(3)], name="preprocessing")


def build_two_in_two_out():
    image, extra = keras.Input((4,), name="image"), keras.Input((3,), name="extra")
    x = L.Concatenate()([L.Dense(5, activation="tanh")(image), extra])
    return keras.Model([image, extra], [L.Dense(3, name="classes")(x), L.Dense(1, name="score")(x)],
                       name="two_in_two_out")


def build_nested():
    inner = keras.Sequential([keras.Input((6,)), L.Dense(5), L.BatchNormalization(center=False)],
                             name="inner")
    inputs = keras.Input((6,))
    return keras.Model(inputs, L.Dense(3)(inner(inputs)), name="nested")


ZOO = {"mlp": build_mlp, "cnn": build_cnn, "residual": build_residual,
       "separable": build_separable, "conv1d": build_conv1d, "recurrent": build_recurrent,
       "embedding": build_embedding, "preprocessing": build_preprocessing,
       "two_in_two_out": build_two_in_two_out, "nested": build_nested}


def randomize_weights(model, seed: int = 1) -> None:
    """Distinct values for every weight, so a swapped or skipped weight changes the outputs."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        name = variable.name
        if name == "count":
            continue
        values = rng.normal(0.0, 0.5, size=tuple(variable.shape))
        if "variance" in name:
            values = np.abs(values) + 0.5
        variable.assign(values.astype(variable.dtype))


def saved_and_loaded(model, tmp_path, name: str):
    """Save as a Keras 3 .keras file and load it back the way QuantLab does."""
    path = tmp_path / f"{name}.keras"
    model.save(path)
    return keras.saving.load_model(path, safe_mode=True, compile=False)


def zoo_model(name: str, tmp_path):
    model = ZOO[name]()
    randomize_weights(model)
    return saved_and_loaded(model, tmp_path, name)


def test_inputs(model) -> list[np.ndarray]:
    """The test's own inputs (not the module's): other seed, other batch size, real dtypes."""
    rng = np.random.default_rng(123)
    arrays = []
    for tensor in model.inputs:
        shape = (BATCH, *tensor.shape[1:])
        if "int" in str(tensor.dtype):
            arrays.append(rng.integers(0, VOCAB, size=shape).astype("int32"))
        else:
            arrays.append(rng.uniform(-2.0, 2.0, size=shape).astype("float32"))
    return arrays


def as_list(outputs) -> list[np.ndarray]:
    return [np.asarray(o) for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]


test_inputs.__test__ = False  # a helper, not a test


# --------------------------------------------------------------------------------------------------
# Rebuilding the zoo
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_rebuilds_with_matching_outputs(name, tmp_path):
    model3 = zoo_model(name, tmp_path)
    rebuilt = rebuild_in_tf_keras(model3, f"{name}.keras")

    model2 = rebuilt.model
    assert isinstance(model2, tf_keras.Model)
    assert [type(layer).__name__ for layer in model2.layers] == [
        type(layer).__name__ for layer in model3.layers]
    inputs = test_inputs(model3)
    feed = inputs if len(inputs) > 1 else inputs[0]
    expected = as_list(model3(feed, training=False))
    actual = as_list(model2(feed, training=False))
    assert [a.shape for a in actual] == [e.shape for e in expected]
    for e, a in zip(expected, actual):
        assert np.max(np.abs(e)) > 0  # the outputs carry signal, so a match means something
        np.testing.assert_allclose(a, e, rtol=0, atol=1e-5 * (1 + np.max(np.abs(e))))
    assert 0.0 <= rebuilt.max_abs_diff <= 1e-5 * (1 + max(np.max(np.abs(e)) for e in expected))
    print(f"{name}: max |keras3 - tf_keras| = {rebuilt.max_abs_diff:.3g}")


def test_rebuilt_weights_equal_the_keras3_weights(tmp_path):
    model3 = zoo_model("cnn", tmp_path)
    model2 = rebuild_in_tf_keras(model3, "cnn.keras").model
    batch_norm3 = next(layer for layer in model3.layers if "batch_norm" in layer.name)
    batch_norm2 = model2.get_layer(batch_norm3.name)
    for w3, w2 in zip(batch_norm3.weights, batch_norm2.weights):
        assert w2.name.split("/")[-1].startswith(w3.name)
        np.testing.assert_array_equal(w2.numpy(), np.asarray(w3))


def test_depthwise_kernel_rename_and_normalization_are_noted(tmp_path):
    separable = rebuild_in_tf_keras(zoo_model("separable", tmp_path), "separable.keras")
    preprocessing = rebuild_in_tf_keras(zoo_model("preprocessing", tmp_path), "pre.keras")
    assert any("'kernel' is tf_keras' 'depthwise_kernel'" in note for note in separable.notes)
    assert any("adapted Normalization mean/variance/count" in note for note in preprocessing.notes)


def test_recurrent_dropout_seed_is_dropped_with_a_note(tmp_path):
    rebuilt = rebuild_in_tf_keras(zoo_model("recurrent", tmp_path), "rnn.keras")
    assert any("seed=7 dropped (dropout seed; training only" in note for note in rebuilt.notes)


def test_a_wrong_weight_fails_verification(tmp_path):
    model3 = zoo_model("mlp", tmp_path)
    model2 = rebuild_in_tf_keras(model3, "mlp.keras").model
    kernel = model2.layers[0].kernel
    kernel.assign(kernel.numpy() + 0.01)
    with pytest.raises(ModelError, match=r"mlp\.keras: the rebuilt tf_keras model's outputs "
                                         "differ"):
        keras3_rebuild.measure_output_diff(model3, model2, "mlp.keras")


def test_sample_inputs_use_integer_tokens_below_the_vocabulary(tmp_path):
    model3 = zoo_model("embedding", tmp_path)
    (tokens,) = keras3_rebuild.sample_inputs(model3)
    assert tokens.dtype == np.int32 and tokens.shape == (keras3_rebuild.SAMPLE_BATCH, 6)
    assert 0 <= tokens.min() and tokens.max() < min(VOCAB, keras3_rebuild.INT_INPUT_HIGH)


# --------------------------------------------------------------------------------------------------
# Config translation
# --------------------------------------------------------------------------------------------------


def serialized(model) -> dict:
    return keras.saving.serialize_keras_object(model)


def layer_named(config: dict, name: str) -> dict:
    return next(layer for layer in config["config"]["layers"] if layer["config"]["name"] == name)


def test_translation_matches_tf_keras_field_names():
    config = translate_config(serialized(build_residual()))
    layers = config["config"]["layers"]
    input_config = layers[0]["config"]
    assert input_config["batch_input_shape"] == [None, 8, 8, 3]
    assert "batch_shape" not in input_config
    conv = layers[1]["config"]
    assert conv["dtype"] == "float32"
    assert conv["kernel_initializer"]["config"] == {"seed": None}  # input_axes/output_axes dropped
    assert conv["kernel_regularizer"]["class_name"] == "L2"
    assert "build_config" not in layers[1]
    assert config["class_name"] == "Functional" and config["module"] == "keras.models"


def test_translation_reads_the_archive_config_json_too(tmp_path):
    from quantlab.safe_load import inspect_keras_archive

    model = build_two_in_two_out()
    model.save(tmp_path / "m.keras")
    from_archive = translate_config(inspect_keras_archive(tmp_path / "m.keras")["config"])
    assert from_archive == translate_config(serialized(model))


def test_translation_writes_tf_keras_inbound_nodes_for_several_inputs():
    model = build_two_in_two_out()
    config = translate_config(serialized(model))
    dense_name = model.layers[1].name if model.layers[1].name != "extra" else model.layers[2].name
    concatenate = next(layer for layer in config["config"]["layers"]
                       if layer["class_name"] == "Concatenate")
    assert concatenate["inbound_nodes"] == [[[dense_name, 0, 0, {}], ["extra", 0, 0, {}]]]
    assert config["config"]["input_layers"] == [["image", 0, 0], ["extra", 0, 0]]
    assert config["config"]["output_layers"] == [["classes", 0, 0], ["score", 0, 0]]


def test_translation_of_keras3_only_defaults_drops_them():
    config = translate_config(serialized(build_preprocessing()))
    layer_norm = next(layer for layer in config["config"]["layers"]
                      if layer["class_name"] == "LayerNormalization")
    assert "rms_scaling" not in layer_norm["config"]
    dense = config["config"]["layers"][-1]["config"]
    assert "quantization_config" not in dense


def test_translated_config_names_only_tf_keras_builtins():
    config = translate_config(serialized(build_recurrent()))
    allowed = keras3_rebuild.allowed_layer_classes()
    for node in keras3_rebuild._walk_objects(config):
        assert node["module"] in ("keras.models", "keras.layers", "keras.initializers",
                                  "keras.regularizers", "keras.constraints"), node
        if node["module"] == "keras.layers":
            assert node["class_name"] in allowed and hasattr(tf_keras.layers, node["class_name"])
    assert "Lambda" not in allowed and "RMSNormalization" not in allowed


@pytest.mark.parametrize("module, class_name", [("keras.layers", "Lambda"),
                                                ("keras.layers", "RMSNormalization"),
                                                ("os", "system"),
                                                ("keras.initializers", "Evil")])
def test_allow_list_check_refuses_other_classes(module, class_name):
    config = translate_config(serialized(build_mlp()))
    config["config"]["layers"][1]["config"]["kernel_initializer"] = {
        "module": module, "class_name": class_name, "config": {}, "registered_name": None}
    with pytest.raises(ModelError, match=rf"m\.keras: the translated config names {module}\."
                                         rf"{class_name}, which is not an allow-listed"):
        keras3_rebuild.check_translated_config(config, "m.keras")


# --------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------


def test_keras3_only_layer_is_refused_by_name(tmp_path):
    assert hasattr(keras.layers, "RMSNormalization") and not hasattr(tf_keras.layers,
                                                                     "RMSNormalization")
    model = keras.Sequential([keras.Input((4,)), L.Dense(4), L.RMSNormalization(name="foo"),
                              L.Dense(3)])
    model3 = saved_and_loaded(model, tmp_path, "m")
    with pytest.raises(ModelError) as raised:
        rebuild_in_tf_keras(model3, "m.keras")
    assert str(raised.value) == (
        "m.keras: layer 'foo' (RMSNormalization) has no tf_keras equivalent, so quantization-aware "
        "training, clustering and pruning cannot rebuild this Keras 3 model; post-training "
        "techniques still apply")


def test_keras3_op_in_a_functional_graph_is_refused_by_name(tmp_path):
    inputs = keras.Input((4,))
    shifted = keras.ops.add(inputs, 1.0)  # recorded as keras.src.ops.numpy.Add, not layers.Add
    model3 = saved_and_loaded(keras.Model(inputs, L.Dense(3)(shifted)), tmp_path, "ops")
    with pytest.raises(ModelError, match=r"ops\.keras: layer '\w+' \(keras\.ops\.Add\) has no "
                                         "tf_keras equivalent"):
        rebuild_in_tf_keras(model3, "ops.keras")


def test_keras3_only_option_is_refused_by_name():
    model = keras.Sequential([keras.Input((4,)), L.LayerNormalization(rms_scaling=True, name="ln")])
    with pytest.raises(ModelError, match=r"layer 'ln' \(LayerNormalization\) sets the Keras 3-only "
                                         r"option rms_scaling=True"):
        translate_config(serialized(model), "ln.keras")


def test_keras3_lora_dense_is_refused():
    model = keras.Sequential([keras.Input((4,)), L.Dense(3, name="adapted")])
    model.layers[0].enable_lora(2)
    with pytest.raises(ModelError, match=r"layer 'adapted' \(Dense\) sets the Keras 3-only option "
                                         "lora_rank=2"):
        translate_config(serialized(model), "lora.keras")


# --------------------------------------------------------------------------------------------------
# The point of the rebuild: tensorflow-model-optimization accepts the result
# --------------------------------------------------------------------------------------------------


def test_tfmot_refuses_keras3_but_wraps_the_rebuilt_models(tmp_path):
    import tensorflow_model_optimization as tfmot

    cnn3 = zoo_model("cnn", tmp_path)
    with pytest.raises(Exception, match="Sequential or Functional"):
        tfmot.quantization.keras.quantize_model(cnn3)

    cnn2 = rebuild_in_tf_keras(cnn3, "cnn.keras").model
    qat = tfmot.quantization.keras.quantize_model(cnn2)
    assert any("quant" in type(layer).__name__.lower() for layer in qat.layers)
    x = test_inputs(cnn3)[0]
    qat_out = qat(x, training=False).numpy()
    assert qat_out.shape == (BATCH, 3) and np.all(np.isfinite(qat_out))

    mlp3 = zoo_model("mlp", tmp_path)
    mlp2 = rebuild_in_tf_keras(mlp3, "mlp.keras").model
    schedule = tfmot.sparsity.keras.ConstantSparsity(0.5, begin_step=0, frequency=1)
    pruned = tfmot.sparsity.keras.prune_low_magnitude(mlp2, pruning_schedule=schedule)
    assert {type(layer).__name__ for layer in pruned.layers} == {"PruneLowMagnitude"}
    pruned.compile("adam", "sparse_categorical_crossentropy")
    x, y = np.random.default_rng(0).normal(size=(32, 8)).astype("float32"), np.arange(32) % 3
    pruned.fit(x, y, batch_size=8, epochs=1, verbose=0,
               callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    kernel = tfmot.sparsity.keras.strip_pruning(pruned).layers[0].kernel.numpy()
    assert np.mean(kernel == 0) >= 0.45  # the pruning really ran on the rebuilt model
