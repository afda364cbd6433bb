"""Worker-side Lab tasks on a real (tiny) model: tensors extracted, fake-quantized accuracy, TFLite's
per-layer sensitivity, and the int8-selective technique.

The model is the seed CNN trained for 2 epochs on scikit-learn's 8x8 digits (a few seconds); these tests
import TensorFlow in the test process, except the one that goes through a worker pool.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from quantlab import lab, sensitivity
from quantlab.cache import ArtifactCache
from quantlab.config import TrainSettings
from quantlab.measure import accuracy, inspect_tflite, predict_tflite
from quantlab.pool import WorkerPool
from quantlab.ptq import configure_converter
from quantlab.techniques import BuildContext, get_technique
from quantlab.workloads import load_digits, train_baseline

NO_EVENTS = lambda event: None  # noqa: E731
# TensorFlow's QuantizationDebugger uses the deprecated tf.lite.Interpreter and warns about it.
pytestmark = [pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated:UserWarning"),
              pytest.mark.filterwarnings("ignore:Statistics for quantized inputs:UserWarning")]


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    """A trained seed CNN and the digits dataset saved as a prepared workload would be."""
    root = tmp_path_factory.mktemp("sensitivity")
    dataset = load_digits()
    model = train_baseline("seed-cnn", dataset, TrainSettings(epochs=2))
    model_path, dataset_path = root / "seed-cnn.keras", root / "digits.npz"
    model.save(model_path)
    dataset.save(dataset_path)
    manifest = {"model_name": "seed-cnn", "model_kind": "keras", "model_path": str(model_path),
                "model_hash": "tinyseedcnn00001", "dataset_name": "digits", "dataset_path": str(dataset_path),
                "dataset_hash": "digits0000000001", "split_sizes": dataset.split_sizes}
    return {"root": root, "manifest": manifest, "model": model, "dataset": dataset}


@pytest.fixture(scope="module")
def extracted(workload):
    result = sensitivity.extract_tensors({"manifest": workload["manifest"], "cache_dir": str(workload["root"])},
                                         NO_EVENTS)
    return result


@pytest.fixture(scope="module")
def sensitivity_result(workload):
    return sensitivity.layer_sensitivity({"manifest": workload["manifest"]}, NO_EVENTS)


def build_context(workload) -> BuildContext:
    from quantlab.tfcompat import import_tensorflow

    from quantlab.keras_convert import keras_converter

    import_tensorflow()
    model = sensitivity.load_model(workload["manifest"])
    return BuildContext(load_keras_model=lambda: model,
                        make_converter=lambda m=None, mode="float32": keras_converter(m or model, mode),
                        dataset=workload["dataset"], manifest=workload["manifest"])


# --- extraction -----------------------------------------------------------------------------------


def test_extracted_weights_are_the_models_own(workload, extracted):
    weights = lab.load_tensors(Path(extracted["weights_path"]))
    by_layer = {layer.name: layer for layer in workload["model"].layers}
    kernel = weights.get("conv2d/kernel")
    np.testing.assert_array_equal(kernel, by_layer["conv2d"].get_weights()[0])
    np.testing.assert_array_equal(weights.get("dense/kernel"), by_layer["dense"].get_weights()[0])
    np.testing.assert_array_equal(weights.get("dense/bias"), by_layer["dense"].get_weights()[1])
    info = weights.info("conv2d/kernel")
    assert info.quantized and info.channel_axis == -1 and info.channels == 12
    assert not weights.info("conv2d/bias").quantized
    assert Path(extracted["weights_path"]) == lab.weights_path(ArtifactCache(workload["root"]), workload["manifest"])


def test_activations_have_the_calibration_batch_and_match_the_model(workload, extracted):
    activations = lab.load_tensors(Path(extracted["activations_path"]))
    calibration = workload["dataset"].x_calib
    names = activations.names
    assert names[-1] == "dense" and {"conv2d", "max_pooling2d", "flatten"} <= set(names)
    for info in activations.infos:
        assert info.shape[0] == len(calibration) == info.samples
    logits = workload["model"](calibration, training=False).numpy()
    np.testing.assert_allclose(activations.get("dense"), logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(activations.get(names[0]), calibration)


def test_forward_with_no_change_equals_calling_the_model(workload):
    x = workload["dataset"].x_test[:32]
    seen = []
    out = sensitivity.forward(workload["model"], x, lambda name, value: seen.append(name))
    np.testing.assert_allclose(out, workload["model"](x, training=False).numpy(), rtol=1e-6, atol=1e-6)
    assert seen[1:] == ["reshape", "conv2d", "max_pooling2d", "flatten", "dense"]


# --- fake-quantized accuracy ----------------------------------------------------------------------


def evaluate(workload, bits: int, **settings) -> dict:
    layers = ["conv2d", "dense"]
    request = lab.FakeQuantRequest({name: bits for name in layers}, **settings)
    return sensitivity.evaluate_fake_quant({"manifest": workload["manifest"], "request": request.to_dict()},
                                           NO_EVENTS)


def test_fake_quantized_weights_cost_little_at_8_bits_and_more_at_2(workload):
    eight, two = evaluate(workload, 8), evaluate(workload, 2)
    float_accuracy = accuracy(workload["model"](workload["dataset"].x_test).numpy(), workload["dataset"].y_test)
    assert eight["float_accuracy"] == pytest.approx(float_accuracy)
    assert abs(eight["accuracy"] - eight["float_accuracy"]) <= 0.03
    assert eight["agreement"] >= 0.95
    assert two["accuracy"] < eight["accuracy"] - 0.05
    assert eight["quantized_layers"] == ["conv2d", "dense"]


def test_without_labels_the_evaluation_gives_agreement_and_no_accuracy(workload, tmp_path):
    """y_test of an unlabelled dataset is a placeholder (-1): scoring it gave an accuracy of 0."""
    import dataclasses

    dataset = workload["dataset"]
    unlabelled = dataclasses.replace(dataset, y_test=np.full_like(dataset.y_test, -1))
    assert not unlabelled.has_labels
    unlabelled.save(tmp_path / "unlabelled.npz")
    manifest = {**workload["manifest"], "dataset_path": str(tmp_path / "unlabelled.npz"),
                "dataset_hash": "unlabelled000001"}
    request = lab.FakeQuantRequest({"conv2d": 8, "dense": 8})
    result = sensitivity.evaluate_fake_quant({"manifest": manifest, "request": request.to_dict()}, NO_EVENTS)
    assert result["accuracy"] is None and result["float_accuracy"] is None
    assert result["agreement"] >= 0.95


def test_float_layers_and_fake_quantized_activations(workload):
    untouched = evaluate(workload, 32)
    assert untouched["accuracy"] == untouched["float_accuracy"] and untouched["quantized_layers"] == []
    both = evaluate(workload, 8, activations=True, activation_bits=8, per_channel=True)
    assert abs(both["accuracy"] - both["float_accuracy"]) <= 0.05
    assert set(both["activation_ranges"]) >= {"conv2d", "dense"}
    low, high = both["activation_ranges"]["conv2d"]
    assert low <= 0 <= high   # after a ReLU: the range includes 0 (asymmetric)


# --- batch norm folded before quantizing, as TFLite does -------------------------------------------


def test_folding_quantizes_the_folded_kernel_and_divides_the_scale_back_out():
    kernel = np.array([[1.0, 1.0], [-0.75, 0.25]])         # Dense: 2 inputs, 2 output channels
    scale = np.array([4.0, 0.5])                              # the batch norm's gamma / sqrt(var + eps)
    per_tensor = lab.FakeQuantRequest({}, per_channel=False).weight_config(2, -1)
    folded = sensitivity.fold_quantize(kernel, scale, per_tensor)
    # folded kernel [[4, 0.5], [-3, 0.125]]: symmetric 2-bit levels -4, 0, 4 (step 4)
    np.testing.assert_allclose(folded * scale, [[4.0, 0.0], [-4.0, 0.0]])
    unfolded = sensitivity.fake_quantize(kernel, per_tensor).values  # step 1: [[1, 1], [-1, 0]]
    np.testing.assert_allclose(unfolded, [[1.0, 1.0], [-1.0, 0.0]])
    assert not np.allclose(folded, unfolded)   # the grid differs once channels are scaled unevenly
    per_channel = lab.FakeQuantRequest({}, per_channel=True).weight_config(8, -1)
    np.testing.assert_allclose(sensitivity.fold_quantize(kernel, scale, per_channel),
                               sensitivity.fake_quantize(kernel, per_channel).values, rtol=1e-6)


def test_a_depthwise_kernel_folds_over_input_channels_times_multiplier():
    kernel = np.ones((3, 3, 2, 2))
    scale = np.array([1.0, 2.0, 3.0, 4.0])                    # channel = input * multiplier + m
    config = lab.FakeQuantRequest({}, per_channel=False).weight_config(2, -2)
    folded = sensitivity.fold_quantize(kernel, scale, config)
    assert folded.shape == kernel.shape
    # 2-bit symmetric grid of the folded kernel: -4, 0, 4. Folded values 1, 2, 3, 4 round to 0, 0
    # (half to even), 4, 4: channel (input 0, m 1) has scale 2 -> 0; (input 1, m 0) has scale 3 -> 4/3.
    np.testing.assert_allclose(folded[0, 0], [[0.0, 0.0], [4.0 / 3.0, 1.0]])
    with pytest.raises(ValueError, match="does not follow a kernel"):
        sensitivity.fold_quantize(kernel, np.ones(3), config)


def test_only_kernels_feeding_a_batch_norm_alone_are_folded(tmp_path):
    from quantlab.tfcompat import import_tensorflow

    _, keras = import_tensorflow()
    inputs = keras.Input((6, 6, 1))
    conv = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    normed = keras.layers.BatchNormalization(name="bn")(conv)
    branch = keras.layers.Conv2D(4, 1, name="shared")(normed)
    side = keras.layers.BatchNormalization(name="bn_side")(branch)
    merged = keras.layers.Add(name="add")([side, branch])     # "shared" also feeds Add: not foldable
    activated = keras.layers.Conv2D(4, 1, activation="relu", name="relu_conv")(merged)
    after_relu = keras.layers.BatchNormalization(name="bn_after_relu")(activated)  # across a ReLU: no
    outputs = keras.layers.Dense(3, name="head")(keras.layers.Flatten(name="flat")(after_relu))
    model = keras.Model(inputs, outputs)
    followers = sensitivity.batch_norm_followers(model)
    assert {name: bn.name for name, bn in followers.items()} == {"conv": "bn"}
    bn = followers["conv"]
    bn.set_weights([np.full(4, 2.0), np.zeros(4), np.zeros(4), np.full(4, 3.0)])
    np.testing.assert_allclose(sensitivity.batch_norm_scale(bn), 2.0 / np.sqrt(3.0 + bn.epsilon))


def test_the_evaluation_folds_the_mobilenet_batch_norms(tmp_path):
    """A built-in MobileNet-family model: every conv is followed by its batch norm, and is folded."""
    from quantlab.workloads import build_model

    model = build_model("mobilenet", (8, 8, 1), 10)
    folded = set(sensitivity.batch_norm_followers(model))
    convs = {layer.name for layer in sensitivity.flat_layers(model)
             if layer.__class__.__name__ in ("Conv2D", "DepthwiseConv2D")}
    assert convs and folded == convs


def test_extraction_adds_each_folded_kernel_and_the_layer_table_counts_it_once(workload, tmp_path):
    from quantlab.workloads import build_model

    model = build_model("mobilenet", (8, 8, 1), 10)
    rng = np.random.default_rng(0)
    for layer in sensitivity.flat_layers(model):
        if layer.__class__.__name__ == "BatchNormalization":  # uneven channels, as after training
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([rng.uniform(0.1, 3.0, gamma.shape), beta, mean, rng.uniform(0.5, 2.0, variance.shape)])
    model.save(tmp_path / "mobilenet.keras")
    manifest = {**workload["manifest"], "model_name": "mobilenet", "model_path": str(tmp_path / "mobilenet.keras"),
                "model_hash": "tinymobilenet001"}
    result = sensitivity.extract_tensors({"manifest": manifest, "cache_dir": str(tmp_path)}, NO_EVENTS)
    weights = lab.load_tensors(Path(result["weights_path"]))
    folded = [info for info in weights.infos if info.role == lab.FOLDED_ROLE]
    followers = sensitivity.batch_norm_followers(model)
    assert sorted(info.layer for info in folded) == sorted(followers)
    depthwise = next(info for info in folded if info.layer_class == "DepthwiseConv2D")
    kernel = weights.get(depthwise.name.split(" folded with ")[0])
    scale = sensitivity.batch_norm_scale(followers[depthwise.layer])
    np.testing.assert_allclose(weights.get(depthwise.name), kernel * scale.reshape(kernel.shape[-2:]), rtol=1e-5)
    assert lab.folded_twin(weights, depthwise.name.split(" folded with ")[0]) == depthwise.name
    table = lab.layer_table(weights, 8)
    assert sorted(table["layer"]) == sorted({info.layer for info in weights.infos
                                            if info.quantized and info.role != lab.FOLDED_ROLE})
    counted = table.set_index("layer").loc[depthwise.layer, "quantized params"]
    assert counted == kernel.size  # the folded view is not counted as more parameters


# --- per-layer sensitivity ------------------------------------------------------------------------


def test_debugger_gives_finite_non_negative_rmse_over_scale_and_a_sorted_ranking(sensitivity_result):
    layers = sensitivity_result["layers"]
    assert [layer["op_name"] for layer in layers if layer["op_name"] in ("CONV_2D", "FULLY_CONNECTED")] == \
        ["CONV_2D", "FULLY_CONNECTED"]
    values = [layer["rmse_scale"] for layer in layers]
    assert all(v is not None and math.isfinite(v) and v >= 0 for v in values)
    by_name = {layer["tensor_name"]: layer["rmse_scale"] for layer in layers}
    ranking = sensitivity_result["ranking"]
    assert sorted(ranking) == sorted(by_name)
    ranked = [by_name[name] for name in ranking]
    assert ranked == sorted(ranked, reverse=True)
    # a quantized conv or dense output carries at least rounding-size error, not orders of magnitude more
    conv = next(layer for layer in layers if layer["op_name"] == "CONV_2D")
    assert 0.05 < conv["rmse_scale"] < 5


def test_sensitivity_frame_flags_the_top_layers(sensitivity_result):
    frame = lab.sensitivity_frame(sensitivity_result, keep_float=2)
    assert int(frame["kept float"].sum()) == 2
    top = set(frame.loc[frame["kept float"], "tensor"])
    assert top == set(sensitivity_result["ranking"][:2])
    assert len(lab.sensitivity_figure(frame).data) == 1


# --- int8-selective -----------------------------------------------------------------------------


def test_selective_variant_keeps_more_ops_float_than_int8_fallback_and_is_measurable(workload):
    from ai_edge_litert.interpreter import Interpreter

    context = build_context(workload)
    technique = get_technique("int8-selective")
    produced = technique.produce(context, technique.resolve({"keep_float": 2}))
    converter, _ = context.make_converter(None, "int8-fallback")
    baseline = configure_converter(converter, "int8-fallback", workload["dataset"].x_calib).convert()

    def float_ops(model: bytes) -> int:
        interpreter = Interpreter(model_content=model)
        ops = interpreter._get_ops_details()
        return sum(1 for op in ops if op["op_name"] not in ("QUANTIZE", "DEQUANTIZE")
                   and any(np.dtype(t) == np.float32 for t in op.get("result_types", [])))

    assert float_ops(produced.tflite) > float_ops(baseline)
    assert inspect_tflite(produced.tflite).float_ops > inspect_tflite(baseline).float_ops
    assert len(produced.details["kept_float"]) == 2
    dataset = workload["dataset"]
    selective_accuracy = accuracy(predict_tflite(produced.tflite, dataset.x_test), dataset.y_test)
    float_accuracy = accuracy(workload["model"](dataset.x_test).numpy(), dataset.y_test)
    assert abs(selective_accuracy - float_accuracy) <= 0.05


def test_keeping_more_layers_than_there_are_keeps_them_all(workload, sensitivity_result):
    context = build_context(workload)
    produced = get_technique("int8-selective").produce(context, {"keep_float": 1000})
    assert len(produced.details["kept_float"]) == len(sensitivity_result["ranking"])
    assert inspect_tflite(produced.tflite).float_ops >= 2


def test_int8_selective_is_registered_with_its_parameter():
    technique = get_technique("int8-selective")
    assert technique.needs_calibration and technique.family == "ptq"
    assert technique.resolve({}) == {"keep_float": 2}
    assert technique.resolve({"keep_float": "3"}) == {"keep_float": 3}


# --- through a worker pool ------------------------------------------------------------------------


def test_run_task_serves_lab_kinds_in_a_worker(workload, tmp_path):
    manifest = dict(workload["manifest"], model_hash="tinyseedcnn00002")
    tasks = [("extract", {"kind": "lab-extract", "cache_dir": str(tmp_path), "manifest": manifest}),
             ("bad", {"kind": "lab-nothing"})]
    with WorkerPool(sensitivity.run_task, size=1, warm=False) as pool:
        with lab.neutral_main():   # an AppTest earlier in this process may have left a page as __main__
            pool.start()
        outcomes = {o.task_id: o for o in pool.run(tasks)}
    assert outcomes["extract"].ok, outcomes["extract"].error
    assert lab.tensors_ready(ArtifactCache(tmp_path), manifest)
    assert "unknown lab task kind" in outcomes["bad"].error
