"""The same work as QuantLab's default post-training sweep, written as one plain script.

Trains seed-cnn on digits-28 with QuantLab's training settings, converts each PTQ variant, evaluates
it with the tutorials' per-image loop and times batch-1 latency with the same run counts. The
benchmark compares QuantLab's wall time against this script's.
"""

import os
import sys
import time

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from ai_edge_litert.interpreter import Interpreter  # noqa: E402

from quantlab.config import MeasureSettings, TrainSettings  # noqa: E402
from quantlab.ptq import PTQ_MODES  # noqa: E402
from quantlab.workloads import load_digits, train_baseline  # noqa: E402


def convert(model, mode, calib):
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if mode != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if mode in ("int8-fallback", "int8-only", "uint8-only", "int16x8"):
        converter.representative_dataset = lambda: ([s[None]] for s in calib)
    if mode in ("int8-only", "uint8-only"):
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = converter.inference_output_type = \
            tf.int8 if mode == "int8-only" else tf.uint8
    if mode == "int16x8":
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    return converter.convert()


def evaluate(model_bytes, x, y):
    interpreter = Interpreter(model_content=model_bytes, num_threads=1)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    correct = 0
    for sample, label in zip(x, y):
        value = sample[None]
        if inp["dtype"] != np.float32:
            scale, zero = inp["quantization"]
            info = np.iinfo(inp["dtype"])
            value = np.clip(np.round(value / scale + zero), info.min, info.max).astype(inp["dtype"])
        interpreter.set_tensor(inp["index"], value)
        interpreter.invoke()
        correct += int(interpreter.get_tensor(out["index"])[0].argmax() == label)
    return correct / len(y), interpreter, inp


def latency(interpreter, settings):
    for _ in range(settings.warmup_runs):
        interpreter.invoke()
    times, started = [], time.perf_counter()
    while len(times) < settings.min_runs or time.perf_counter() - started < settings.min_seconds:
        t0 = time.perf_counter()
        interpreter.invoke()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1000


def main():
    data = load_digits(28)
    model = train_baseline("seed-cnn", data, TrainSettings())
    settings = MeasureSettings()
    model.predict(data.x_test, verbose=0)
    for mode in PTQ_MODES:
        model_bytes = convert(model, mode, data.x_calib)
        accuracy, interpreter, _ = evaluate(model_bytes, data.x_test, data.y_test)
        print(f"{mode}: {len(model_bytes)} bytes, accuracy {accuracy:.4f}, "
              f"p50 {latency(interpreter, settings):.3f} ms", flush=True)


if __name__ == "__main__":
    main()
