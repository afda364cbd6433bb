"""Fine-tuning with tfmot (quantlab/finetune.py): real, short runs of the built-in seed CNN on digits.

Structure is asserted, not accuracy: clustered kernels hold at most k values, pruned kernels reach the
target, QAT variants convert to int8 kernels, optimized variants gzip smaller, unwrappable models give
a one-line error, equal seeds give equal weights, and the caller's model and arrays stay untouched.
"""

import gzip
import json

import numpy as np
import pytest

from quantlab import finetune as ft
from quantlab.errors import DatasetError, ModelError, QuantLabError, TechniqueError
from quantlab.tfcompat import import_tensorflow
from quantlab.workloads import build_model, load_digits

tf, keras = import_tensorflow()
import tensorflow_model_optimization as tfmot  # noqa: E402  (after import_tensorflow)
from ai_edge_litert.interpreter import Interpreter  # noqa: E402

SMALL = 320  # samples in the short fine-tunes: 10 steps of 32
CLUSTERS = 8


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def baseline(digits):
    """A compiled and trained seed CNN (the state in which pruning used to crash)."""
    model = build_model("seed-cnn", digits.input_shape, digits.num_classes, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(2e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(digits.x_train, digits.y_train, epochs=3, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module")
def kernel_layers(baseline):
    """Names of the baseline's Conv2D and Dense layers (Keras numbers them per process)."""
    return sorted(layer.name for layer in baseline.layers if hasattr(layer, "kernel"))


@pytest.fixture(scope="module")
def pruned(baseline, digits):
    return ft.prune(baseline, digits.x_train, digits.y_train, epochs=1,
                    x_val=digits.x_calib, y_val=digits.y_calib)


@pytest.fixture(scope="module")
def clustered_with_events(baseline, digits):
    events = []
    result = ft.cluster(baseline, digits.x_train, digits.y_train, number_of_clusters=CLUSTERS,
                        x_val=digits.x_calib, y_val=digits.y_calib, on_progress=events.append)
    return result, events


@pytest.fixture(scope="module")
def float_gzip_size(baseline):
    return len(gzip.compress(to_tflite(baseline), 9))


def to_tflite(model, optimize=False):
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if optimize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return converter.convert()


def tflite_kernels(tflite, baseline):
    """{layer name: (dtype, values)} of the TFLite tensors holding the baseline's kernels (O..I layout)."""
    wanted = {}
    for layer in baseline.layers:
        if hasattr(layer, "kernel"):
            shape = tuple(layer.kernel.shape)
            wanted[(shape[-1],) + shape[:-1]] = layer.name
    interpreter = Interpreter(model_content=tflite)
    interpreter.allocate_tensors()
    found = {}
    for detail in interpreter.get_tensor_details():
        name = wanted.get(tuple(detail["shape"]))
        if name and name not in found:
            found[name] = (np.dtype(detail["dtype"]), interpreter.get_tensor(detail["index"]))
    assert set(found) == set(wanted.values())
    return found


def weights_of(model):
    return [w.copy() for w in model.get_weights()]


# --- pruning ----------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["constant", "polynomial"])
def test_pruning_reaches_the_target_for_both_schedules(baseline, digits, kernel_layers, schedule):
    result = ft.prune(baseline, digits.x_train, digits.y_train, target_sparsity=0.6, schedule=schedule,
                      epochs=1)
    sparsity = ft.measure_sparsity(result.model, kernel_layers)
    assert abs(sparsity["overall"] - 0.6) <= 0.01
    for layer in kernel_layers:
        assert abs(sparsity["layers"][layer]["sparsity"] - 0.6) <= 0.01
    stats = result.stats
    assert stats["pruned_layers"] == kernel_layers and stats["sparsity"] == sparsity
    assert stats["accuracy_before"] is None and stats["accuracy_after"] is None  # no held-out split
    assert stats["schedule"]["name"] == schedule and stats["schedule"]["end_step"] <= stats["steps"]
    assert not any("prune" in layer.name for layer in result.model.layers)  # stripped


@pytest.mark.parametrize("schedule", ["constant", "polynomial"])
def test_a_fine_tune_shorter_than_tfmots_default_frequency_still_prunes(baseline, digits, schedule):
    result = ft.prune(baseline, digits.x_train[:96], digits.y_train[:96], schedule=schedule, epochs=1)
    assert result.stats["steps"] == 3
    assert result.stats["sparsity"]["overall"] >= 0.49


def test_with_tfmots_default_frequency_a_short_fine_tune_leaves_no_sparsity(baseline, digits):
    """The cause of the 0% case: masks update only every `frequency` (default 100) steps."""
    sp = tfmot.sparsity.keras
    copy = keras.models.clone_model(baseline)
    copy.set_weights(baseline.get_weights())
    wrapped = sp.prune_low_magnitude(copy, pruning_schedule=sp.ConstantSparsity(0.5, begin_step=0))
    wrapped.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    wrapped.fit(digits.x_train[:SMALL], digits.y_train[:SMALL], batch_size=32, verbose=0,
                callbacks=[sp.UpdatePruningStep()])
    assert ft.measure_sparsity(sp.strip_pruning(wrapped))["overall"] == 0.0


def test_clustering_then_pruning_one_compiled_and_trained_baseline_works(baseline, digits, kernel_layers):
    """The crash case. Raw tfmot: cluster_weights wraps the caller's own layers and replaces their
    `kernel` variable by a tensor, so prune_low_magnitude on that same model object fails with
    "'EagerTensor' object has no attribute 'assign'". finetune wraps a rebuilt copy instead."""
    sp = tfmot.sparsity.keras
    model = keras.models.clone_model(baseline)
    model.set_weights(baseline.get_weights())
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(digits.x_train[:SMALL], digits.y_train[:SMALL], verbose=0)  # compiled and trained

    ft.cluster(model, digits.x_train[:SMALL], digits.y_train[:SMALL], number_of_clusters=CLUSTERS)
    result = ft.prune(model, digits.x_train[:SMALL], digits.y_train[:SMALL], epochs=1)
    assert abs(result.stats["sparsity"]["overall"] - 0.5) <= 0.01
    assert result.stats["pruned_layers"] == kernel_layers

    clustered = tfmot.clustering.keras.cluster_weights(model, number_of_clusters=CLUSTERS)
    clustered(digits.x_train[:2])  # an eager call: model's layers now hold an EagerTensor kernel
    with pytest.raises(AttributeError, match="EagerTensor' object has no attribute 'assign'"):
        # Raised when the pruning wrapper is first called (here: while prune_low_magnitude builds it).
        raw = sp.prune_low_magnitude(model, pruning_schedule=sp.ConstantSparsity(0.5, 0, frequency=1))
        raw.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        raw.fit(digits.x_train[:64], digits.y_train[:64], verbose=0, callbacks=[sp.UpdatePruningStep()])
    # Such a model has lost its kernel variables; finetune says so in one line instead of crashing.
    expected = "kernel of layer .* is a EagerTensor, not a variable.*load the model again"
    with pytest.raises(ModelError, match=expected) as error:
        ft.prune(model, digits.x_train[:SMALL], digits.y_train[:SMALL])
    assert "\n" not in str(error.value)


def test_pruning_schedules_update_the_masks_inside_the_run():
    sp = tfmot.sparsity.keras
    for total in (1, 2, 3, 10, 36, 99, 1000, 10_000):
        for name in ft.PRUNING_SCHEDULES:
            schedule, stats = ft._pruning_schedule(sp, name, 0.5, total)
            assert 1 <= stats["frequency"] <= 100 and 1 <= stats["end_step"] <= total
            # The wrapper's step counter runs 1..total during the fine-tune.
            update = schedule(tf.constant(np.arange(1, total + 1), tf.int64))[0].numpy()
            assert update.any(), (name, total)
            last = int(np.flatnonzero(update)[-1]) + 1
            assert float(schedule(tf.constant(last, tf.int64))[1]) == pytest.approx(0.5), (name, total)


def test_falling_short_of_the_target_is_a_clear_error():
    report = {"layers": {"conv2d": {"sparsity": 0.0}, "dense": {"sparsity": 0.1}}, "overall": 0.09}
    with pytest.raises(TechniqueError, match=r"reached 9\.0% overall sparsity.*target 50\.0%") as error:
        ft._require_sparsity("prune", report, 0.5)
    assert "\n" not in str(error.value) and "conv2d 0.0%" in str(error.value)
    ft._require_sparsity("prune", dict(report, overall=0.495), 0.5)  # within 1 point


# --- clustering -------------------------------------------------------------------------------


@pytest.mark.parametrize("centroid_init", ft.CENTROID_INITS)
def test_clustered_kernels_hold_at_most_k_values(baseline, digits, kernel_layers, centroid_init):
    result = ft.cluster(baseline, digits.x_train[:SMALL], digits.y_train[:SMALL],
                        number_of_clusters=CLUSTERS, centroid_init=centroid_init)
    unique = ft.count_unique_weights(result.model)
    assert result.stats["clustered_layers"] == kernel_layers
    assert all(unique[layer] <= CLUSTERS for layer in kernel_layers), unique
    assert result.stats["unique_values"] == unique
    assert not any("cluster" in layer.name for layer in result.model.layers)  # stripped


def test_cluster_reports_accuracy_and_progress(clustered_with_events, digits):
    result, events = clustered_with_events
    stats = result.stats
    for key in ("accuracy_before", "accuracy_before_fine_tune", "accuracy_after"):
        assert 0.0 <= stats[key] <= 1.0
    assert stats["val_samples"] == len(digits.x_calib) and stats["train_samples"] == len(digits.x_train)
    steps = stats["steps_per_epoch"]
    assert events and all(e["stage"] == "fine-tune" and e["technique"] == "cluster" for e in events)
    assert set(events[-1]) == {"stage", "technique", "epoch", "epochs", "step", "steps", "loss"}
    assert (events[-1]["epoch"], events[-1]["epochs"], events[-1]["step"], events[-1]["steps"]) == \
        (1, 1, steps, steps)
    assert np.isfinite(events[-1]["loss"])
    json.dumps(stats)  # JSON-serialisable as it is


def test_sparsity_preserving_clustering_keeps_zeros_and_clusters(baseline, digits, kernel_layers):
    result = ft.sparsity_preserving_cluster(baseline, digits.x_train[:SMALL], digits.y_train[:SMALL],
                                            prune_epochs=1, number_of_clusters=CLUSTERS)
    sparsity = ft.measure_sparsity(result.model, kernel_layers)
    unique = ft.count_unique_weights(result.model)
    assert sparsity["overall"] >= 0.49
    assert all(unique[layer] <= CLUSTERS for layer in kernel_layers), unique
    assert result.stats["technique"] == "prune-cluster" and "prune" in result.stats["stages"]


# --- quantization-aware training --------------------------------------------------------------


def test_qat_model_has_fake_quant_and_converts_to_int8_kernels(baseline, digits):
    result = ft.quantization_aware_train(baseline, digits.x_train[:SMALL], digits.y_train[:SMALL],
                                         x_val=digits.x_calib, y_val=digits.y_calib)
    wrappers = [layer for layer in result.model.layers
                if isinstance(layer, tfmot.quantization.keras.QuantizeWrapperV2)]
    assert wrappers and result.stats["quantized_layers"] == [layer.name for layer in wrappers]
    assert any("FakeQuant" in op.type for op in
               tf.function(result.model).get_concrete_function(
                   tf.TensorSpec([1, *digits.input_shape], tf.float32)).graph.get_operations())
    kernels = tflite_kernels(to_tflite(result.model, optimize=True), baseline)
    assert all(dtype == np.int8 for dtype, _ in kernels.values()), kernels
    assert 0 <= result.stats["accuracy_before"] <= 1 and 0 <= result.stats["accuracy_after"] <= 1


def test_cluster_preserving_qat_keeps_at_most_k_values_per_int8_channel(baseline, digits):
    events = []
    result = ft.cluster_preserving_qat(baseline, digits.x_train[:SMALL], digits.y_train[:SMALL],
                                       number_of_clusters=CLUSTERS, on_progress=events.append)
    kernels = tflite_kernels(to_tflite(result.model, optimize=True), baseline)
    for dtype, values in kernels.values():
        assert dtype == np.int8
        per_channel = [np.unique(channel).size for channel in values.reshape(values.shape[0], -1)]
        assert max(per_channel) <= CLUSTERS, per_channel
    assert {(e["part"], e["parts"]) for e in events} == {(1, 2), (2, 2)}
    json.dumps(result.stats)


def test_pruning_preserving_qat_keeps_the_sparsity_in_int8(baseline, digits):
    result = ft.pruning_preserving_qat(baseline, digits.x_train[:SMALL], digits.y_train[:SMALL],
                                       prune_epochs=1)
    kernels = tflite_kernels(to_tflite(result.model, optimize=True), baseline)
    zeros = sum(int(np.count_nonzero(v == 0)) for _, v in kernels.values())
    assert all(dtype == np.int8 for dtype, _ in kernels.values())
    assert zeros / sum(v.size for _, v in kernels.values()) >= 0.49
    json.dumps(result.stats)


def test_every_collaborative_technique_is_supported_here():
    assert ft.UNSUPPORTED == {}
    assert {"qat-int8", "cluster", "prune", "cqat-int8", "pqat-int8", "prune-cluster"} == set(ft.TECHNIQUES)


# --- size -------------------------------------------------------------------------------------


def test_clustered_and_pruned_models_gzip_smaller_than_the_baseline(pruned, clustered_with_events,
                                                                     float_gzip_size):
    for result in (pruned, clustered_with_events[0]):
        assert len(gzip.compress(to_tflite(result.model), 9)) < float_gzip_size


# --- models tfmot cannot wrap -------------------------------------------------------------------


class Scale(keras.layers.Layer):
    def build(self, input_shape):
        self.w = self.add_weight(name="w", shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.w


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.flatten = keras.layers.Flatten()
        self.dense = keras.layers.Dense(10)

    def call(self, x):
        return self.dense(self.flatten(x))


def functional(middle):
    inputs = keras.Input((8, 8))
    x = keras.layers.Flatten()(inputs)
    return keras.Model(inputs, keras.layers.Dense(10)(middle(x)))


def subclassed():
    model = Subclassed()
    model(np.zeros((1, 8, 8), np.float32))
    return model


def nested():
    inner = keras.Sequential([keras.layers.Dense(16, input_shape=(64,))], name="inner_block")
    return functional(inner)


def keras3():
    import keras as keras3

    inputs = keras3.Input((8, 8))
    return keras3.Model(inputs, keras3.layers.Dense(10)(keras3.layers.Flatten()(inputs)))


TECHNIQUE_CALLS = {"qat": ft.quantization_aware_train, "cluster": ft.cluster, "prune": ft.prune}


@pytest.mark.parametrize("make, technique, expected", [
    (subclassed, "qat", "Subclassed is a subclassed model.*Functional API"),
    (subclassed, "cluster", "Subclassed is a subclassed model"),
    (subclassed, "prune", "Subclassed is a subclassed model"),
    (lambda: functional(keras.layers.Lambda(lambda t: t * 2, name="double")), "qat",
     "layer 'double' is a Lambda layer.*replace it"),
    (lambda: functional(Scale(name="scale")), "qat", "layer 'scale' is a custom layer.*replace it"),
    (lambda: functional(Scale(name="scale")), "prune", "layer 'scale' \\(Scale\\) is not supported.*prune"),
    (lambda: functional(Scale(name="scale")), "cluster", "layer 'scale' \\(Scale\\) is not supported.*cluster"),
    (nested, "prune", "layer 'inner_block' is a nested model.*rebuild the model flat"),
    (keras3, "qat", "Keras 3.*tf_keras"),
], ids=["subclassed-qat", "subclassed-cluster", "subclassed-prune", "lambda-qat", "custom-qat",
        "custom-prune", "custom-cluster", "nested-prune", "keras3-qat"])
def test_a_model_tfmot_cannot_wrap_gives_a_one_line_error(make, technique, expected, digits):
    with pytest.raises(ModelError, match=expected) as error:
        TECHNIQUE_CALLS[technique](make(), digits.x_train[:32], digits.y_train[:32])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("call, expected", [
    (lambda m, x, y: ft.prune(m, x, y, schedule="cubic"), "schedule must be one of constant, polynomial"),
    (lambda m, x, y: ft.prune(m, x, y, target_sparsity=50), "target_sparsity must be between 0 and 1"),
    (lambda m, x, y: ft.cluster(m, x, y, centroid_init="kmeans"), "centroid_init must be one of"),
    (lambda m, x, y: ft.cluster(m, x, y, number_of_clusters=1), "number_of_clusters must be an integer >= 2"),
    (lambda m, x, y: ft.quantization_aware_train(m, x, y, epochs=0), "epochs must be a whole number >= 1"),
    (lambda m, x, y: ft.quantization_aware_train(m, x, y, learning_rate=0), "learning_rate must be > 0"),
])
def test_bad_parameters_are_technique_errors(baseline, digits, call, expected):
    with pytest.raises(TechniqueError, match=expected):
        call(baseline, digits.x_train[:32], digits.y_train[:32])


@pytest.mark.parametrize("x, y, expected", [
    (np.zeros((4, 8, 8)), np.zeros(3, int), "4 inputs but 3 labels"),
    (np.zeros((4, 28, 28)), np.zeros(4, int), "the model expects"),
    (np.zeros((4, 8, 8)), np.eye(10)[:4], "integer class id"),
    (np.zeros((4, 8, 8)), np.array([0, 1, 2, 10]), "the model has 10 outputs"),
])
def test_bad_training_data_is_a_dataset_error(baseline, x, y, expected):
    with pytest.raises(DatasetError, match=expected):
        ft.prune(baseline, x, y)
    assert issubclass(DatasetError, QuantLabError)


# --- determinism and purity ---------------------------------------------------------------------


def test_same_seed_same_weights_and_the_callers_model_and_data_are_untouched(baseline, digits):
    before = weights_of(baseline)
    x, y = digits.x_train[:SMALL].copy(), digits.y_train[:SMALL].copy()
    first = ft.cluster(baseline, x, y, number_of_clusters=CLUSTERS, centroid_init="random", seed=3,
                       x_val=digits.x_calib, y_val=digits.y_calib)
    second = ft.cluster(baseline, x, y, number_of_clusters=CLUSTERS, centroid_init="random", seed=3,
                        x_val=digits.x_calib, y_val=digits.y_calib)
    for a, b in zip(first.model.get_weights(), second.model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert first.stats["accuracy_after"] == second.stats["accuracy_after"]
    for a, b in zip(before, baseline.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert all(isinstance(layer.kernel, tf.Variable) for layer in baseline.layers if hasattr(layer, "kernel"))
    np.testing.assert_array_equal(x, digits.x_train[:SMALL])
    np.testing.assert_array_equal(y, digits.y_train[:SMALL])

