"""quantlab.measure on real conversions of a tiny tf_keras CNN (each variant converted once)."""

from __future__ import annotations

import numpy as np
import pytest

from quantlab import measure
from quantlab.config import MeasureSettings
from quantlab.errors import DatasetError, ModelError, TechniqueError

pytestmark = pytest.mark.filterwarnings("ignore:Statistics for quantized inputs:UserWarning")

SHAPE = (8, 8)
N_EVAL = 700  # above PROBE_MIN_SAMPLES, so predict_tflite's batch-size probe runs


@pytest.fixture(scope="module")
def tf_and_keras():
    from quantlab.tfcompat import import_tensorflow

    return import_tensorflow()


@pytest.fixture(scope="module")
def keras_model(tf_and_keras):
    _, tf_keras = tf_and_keras
    tf_keras.utils.set_random_seed(0)
    return tf_keras.Sequential([
        tf_keras.layers.InputLayer(input_shape=SHAPE),
        tf_keras.layers.Reshape((*SHAPE, 1)),
        tf_keras.layers.Conv2D(8, 3, activation="relu"),
        tf_keras.layers.Flatten(),
        tf_keras.layers.Dense(10),
    ])


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(42)
    return {
        "calib": rng.random((64, *SHAPE), dtype=np.float32),
        "eval": rng.random((N_EVAL, *SHAPE), dtype=np.float32),
    }


@pytest.fixture(scope="module")
def variants(tf_and_keras, keras_model, data):
    """The model converted to each variant QuantLab compares: name -> .tflite bytes."""
    tf, _ = tf_and_keras
    calib = data["calib"]

    def representative():
        for i in range(len(calib)):
            yield [calib[i:i + 1]]

    def convert(optimize=False, rep=False, ops=None, io=None):
        converter = tf.lite.TFLiteConverter.from_keras_model(keras_model)
        if optimize:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if rep:
            converter.representative_dataset = representative
        if ops:
            converter.target_spec.supported_ops = [ops]
        if io:
            converter.inference_input_type = io
            converter.inference_output_type = io
        return converter.convert()

    return {
        "float32": convert(),
        "dynamic": convert(optimize=True),
        "int8_float_io": convert(optimize=True, rep=True),
        "int8": convert(optimize=True, rep=True, ops=tf.lite.OpsSet.TFLITE_BUILTINS_INT8, io=tf.int8),
        "uint8": convert(optimize=True, rep=True, ops=tf.lite.OpsSet.TFLITE_BUILTINS_INT8, io=tf.uint8),
        "16x8": convert(optimize=True, rep=True,
                        ops=tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8),
    }


@pytest.fixture(scope="module")
def float_outputs(variants, data):
    return measure.predict_tflite(variants["float32"], data["eval"])


def test_float32_outputs_match_keras(keras_model, variants, data, float_outputs):
    expected = keras_model.predict(data["eval"], verbose=0)
    assert float_outputs.dtype == np.float32
    assert float_outputs.shape == (N_EVAL, 10)
    np.testing.assert_allclose(float_outputs, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["dynamic", "int8_float_io", "int8", "uint8", "16x8"])
def test_quantized_predictions_agree_with_float(variants, data, float_outputs, variant):
    outputs = measure.predict_tflite(variants[variant], data["eval"])
    assert outputs.dtype == np.float32 and outputs.shape == float_outputs.shape
    assert measure.agreement(outputs, float_outputs) >= 0.9
    assert measure.sqnr_db(outputs, float_outputs) > 15


def test_integer_input_is_quantized_like_a_manual_invoke(variants, data):
    from ai_edge_litert.interpreter import Interpreter

    for variant, dtype in (("int8", np.int8), ("uint8", np.uint8)):
        interpreter = Interpreter(model_content=variants[variant])
        interpreter.allocate_tensors()
        inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        assert inp["dtype"] == dtype
        scale, zero_point = inp["quantization"]
        sample = data["eval"][3]
        info = np.iinfo(dtype)
        q = np.clip(np.round(sample / scale) + zero_point, info.min, info.max).astype(dtype)
        interpreter.set_tensor(inp["index"], q[None])
        interpreter.invoke()
        out_scale, out_zero_point = out["quantization"]
        manual = (interpreter.get_tensor(out["index"])[0].astype(np.float32) - out_zero_point) * out_scale

        got = measure.predict_tflite(variants[variant], data["eval"][3:4])
        np.testing.assert_array_equal(got[0], manual.astype(np.float32))


def test_quantize_input_rounds_and_clips():
    q = measure.quantize_input(np.array([-10.0, -0.25, 0.0, 0.25, 0.26, 10.0]), np.int8, 0.5, 3)
    assert q.dtype == np.int8
    # -0.25/0.5 = -0.5 rounds away from zero to -1; 0.25/0.5 = 0.5 -> 1; far values clip.
    assert q.tolist() == [-17, 2, 3, 4, 4, 23]
    assert measure.quantize_input(np.array([5.0, -5.0]), np.uint8, 0.01, 128).tolist() == [255, 0]


@pytest.mark.parametrize("variant", ["float32", "int8"])
def test_workers_and_batching_give_identical_outputs(variants, data, variant):
    model, x = variants[variant], data["eval"]
    one = measure.predict_tflite(model, x, workers=1, batch_size=1)
    np.testing.assert_array_equal(measure.predict_tflite(model, x, workers=2), one)
    np.testing.assert_array_equal(measure.predict_tflite(model, x, workers=1), one)
    np.testing.assert_array_equal(measure.predict_tflite(model, x, workers=3, batch_size=32), one)
    np.testing.assert_array_equal(measure.predict_tflite(model, x[:5], workers=2), one[:5])


def test_probe_reports_a_verified_choice(variants, data):
    probe = measure.probe_batch_size(variants["float32"], data["eval"])
    assert probe.batch_size in measure.PROBE_BATCH_SIZES
    assert probe.samples == measure.PROBE_SAMPLES
    assert probe.seconds_per_sample[1] is not None
    assert probe.seconds_per_sample[probe.batch_size] == min(
        v for v in probe.seconds_per_sample.values() if v is not None)


def test_input_shapes_are_matched_by_size(variants, data, float_outputs):
    x = data["eval"][:20]
    with_channel = measure.predict_tflite(variants["float32"], x[..., None])
    np.testing.assert_array_equal(with_channel, float_outputs[:20])
    flat = measure.predict_tflite(variants["float32"], x.reshape(20, -1))
    np.testing.assert_array_equal(flat, float_outputs[:20])
    with pytest.raises(DatasetError, match="do not fit the model input"):
        measure.predict_tflite(variants["float32"], np.zeros((3, 9, 9), np.float32))
    empty = measure.predict_tflite(variants["float32"], np.zeros((0, *SHAPE), np.float32))
    assert empty.shape == (0, 10)


def test_metrics():
    outputs = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]], np.float32)
    assert measure.accuracy(outputs, [1, 0, 0, 0]) == 0.75
    assert measure.agreement(outputs, outputs[:, ::-1]) == 0.0
    assert measure.agreement(outputs, outputs * 2) == 1.0
    assert measure.sqnr_db(outputs, outputs) is None
    ref = np.ones(100)
    assert measure.sqnr_db(ref + 0.1, ref) == pytest.approx(20.0)
    with pytest.raises(DatasetError):
        measure.accuracy(outputs, [1, 0])


def test_latency_stats(variants, data):
    settings = MeasureSettings(num_threads=1, warmup_runs=3, min_runs=30, min_seconds=0.05)
    stats = measure.measure_latency(variants["int8"], data["eval"][0], settings)
    assert stats.runs >= 30 and stats.seconds >= 0.05
    assert 0 < stats.p50_ms <= stats.p90_ms
    assert stats.mean_ms > 0 and stats.std_ms >= 0
    assert (stats.num_threads, stats.warmup_runs) == (1, 3)
    assert len(stats.samples_ms) == min(stats.runs, measure.MAX_KEPT_LATENCY_SAMPLES)
    as_dict = stats.to_dict()
    assert as_dict["runs"] == stats.runs and isinstance(as_dict["samples_ms"], list)
    assert stats.others_cpu_share is None or 0.0 <= stats.others_cpu_share <= 1.0
    assert "perf_counter" in measure.LATENCY_METHOD


def test_gzip_size_is_deterministic_and_compresses():
    blob = b"quantlab " * 1000
    assert measure.gzip_size(blob) < len(blob)
    assert measure.gzip_size(blob) == measure.gzip_size(blob)


def test_inspect_int8_only(variants):
    inspection = measure.inspect_tflite(variants["int8"])
    (inp,) = inspection.inputs
    assert inp["dtype"] == "int8" and inp["shape"] == [1, *SHAPE]
    assert inp["scale"] > 0 and isinstance(inp["zero_point"], int)
    assert inspection.outputs[0]["dtype"] == "int8"
    assert inspection.float_ops == 0
    assert inspection.total_ops == len(inspection.ops) > 0
    assert "CONV_2D" in inspection.op_counts and "DELEGATE" not in inspection.op_counts
    assert inspection.to_dict()["float_ops"] == 0


def test_inspect_float_models(variants):
    float32 = measure.inspect_tflite(variants["float32"])
    assert float32.inputs[0]["dtype"] == "float32" and float32.inputs[0]["scale"] is None
    assert float32.float_ops > 0
    conv = next(op for op in float32.ops if op["op_name"] == "CONV_2D")
    assert conv["computes_in_float"] and conv["output_dtypes"] == ["float32"]

    float_io = measure.inspect_tflite(variants["int8_float_io"])
    assert float_io.inputs[0]["dtype"] == "float32"
    assert float_io.float_ops == 0
    assert {"QUANTIZE", "DEQUANTIZE"} <= set(float_io.op_counts)


@pytest.mark.parametrize("blob", [b"", b"not a model at all" * 10, b"\x1c\x00\x00\x00TFL3" + bytes(300)])
def test_bad_bytes_raise_model_error(blob):
    for call in (lambda: measure.predict_tflite(blob, np.zeros((2, *SHAPE), np.float32)),
                 lambda: measure.inspect_tflite(blob),
                 lambda: measure.measure_latency(blob, np.zeros(SHAPE, np.float32), MeasureSettings()),
                 lambda: measure.create_interpreter(blob)):
        with pytest.raises(ModelError, match="is not a valid TensorFlow Lite model: .*; re-export it "
                                             "with TFLiteConverter") as info:
            call()
        assert "\n" not in str(info.value)


def test_truncated_model_raises_model_error(variants):
    with pytest.raises(ModelError, match="not a valid TensorFlow Lite model"):
        measure.inspect_tflite(variants["float32"][: len(variants["float32"]) // 2])


def test_measure_does_not_import_tensorflow_or_streamlit():
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, quantlab.measure as m, numpy as np; "
            "m.gzip_size(b'x'); "
            "print(any(k.split('.')[0] in ('tensorflow', 'streamlit', 'tf_keras') for k in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == "False"


@pytest.fixture(scope="module")
def two_kernel_variants(tf_and_keras):
    """Dense 32->64 (2,048 kernel values) then Dense 64->3 (192): float32, dynamic and float16 files."""
    tf, tf_keras = tf_and_keras
    inputs = tf_keras.Input((32,))
    model = tf_keras.Model(inputs, tf_keras.layers.Dense(3)(tf_keras.layers.Dense(64)(inputs)))
    files = {}
    for name, float16 in (("dynamic", False), ("float16", True)):
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if float16:
            converter.target_spec.supported_types = [tf.float16]
        files[name] = converter.convert()
    return files


def kernels_of(tflite: bytes) -> list[tuple[str, int]]:
    return [(op["kernel_dtype"], op["kernel_values"])
            for op in measure.inspect_tflite(tflite).ops if "kernel_dtype" in op]


def test_inspection_records_each_kernel_as_stored_in_the_file(two_kernel_variants):
    assert kernels_of(two_kernel_variants["dynamic"]) == [("int8", 2048), ("float32", 192)]
    # float16 files widen their kernels with a DEQUANTIZE op: the stored kernel is float16
    assert kernels_of(two_kernel_variants["float16"]) == [("float16", 2048), ("float16", 192)]


def test_an_int16x8_file_litert_would_abort_on_is_refused_before_any_invoke(tf_and_keras, keras_model, data):
    """tf_keras's LayerNormalization makes a SUB from a constant of zeros; under int16x8 that input has
    quantization scale 0 and LiteRT 2.3 aborts the process at the first invoke. Read, never invoked."""
    from types import SimpleNamespace

    from quantlab.keras_convert import keras_converter
    from quantlab.techniques import BuildContext, get_technique

    _, tf_keras = tf_and_keras
    inputs = tf_keras.Input((6, 8))
    normalized = tf_keras.Model(inputs, tf_keras.layers.LayerNormalization()(inputs))
    rng = np.random.default_rng(0)
    outcomes = {}
    for name, model, calib in (("layer norm", normalized, rng.random((16, 6, 8), np.float32)),
                               ("conv", keras_model, data["calib"])):
        context = BuildContext(load_keras_model=lambda m=model: m,
                               make_converter=lambda m=None, mode="float32", model=model: keras_converter(m or model, mode),
                               dataset=SimpleNamespace(x_calib=calib), manifest={})
        try:
            produced = get_technique("int16x8").produce(context, {})
            outcomes[name] = measure.int16_abort_reason(produced.tflite)
        except TechniqueError as error:
            outcomes[name] = str(error)
    assert outcomes["layer norm"].startswith("int16x8: op SUB has the 16-bit input")
    assert "quantization scale 0" in outcomes["layer norm"] and "lq-w8a16" in outcomes["layer norm"]
    assert outcomes["conv"] is None
