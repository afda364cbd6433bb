"""QuantLab's evaluator against the seed tutorials' per-image loop, on 10,000 samples.

For each built-in model (quantlab.workloads.build_model, seeded and untrained: speed and equality do not
depend on training) and each variant (float32; integer-only int8 with int8 input and output), both
evaluators run on the digits-28 test split tiled to 10,000 samples. The baseline is the tutorials' loop:
one quantize (rounding, unlike the tutorials' truncating astype) / set_tensor / invoke / get_tensor per
sample. Both are timed end to end (interpreter creation, quantization and, for QuantLab, the batch-size
probe included), interleaved, best of --repeats; the outputs must be bitwise equal.

The machine is shared: the "others" column is the CPU share used by other processes during QuantLab's
best run (from /proc/stat minus this process's CPU time), so a contended run can be told from a slow one.

Goals: QuantLab never slower than the loop; at least 1.5x on mobilenet using both cores.

    .venv/bin/python benchmarks/bench_evaluate.py [--repeats 3] [--samples 10000] [--strict]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantlab import measure  # noqa: E402
from quantlab.workloads import build_model, load_digits  # noqa: E402

MODELS = ("seed-cnn", "mobilenet", "mlp")
VARIANTS = ("float32", "int8")
GOAL_NEVER_SLOWER = 1.0
GOAL_MOBILENET = 1.5


def convert(keras_model, variant: str, calib: np.ndarray) -> bytes:
    from quantlab.tfcompat import import_tensorflow

    tf, _ = import_tensorflow()
    converter = tf.lite.TFLiteConverter.from_keras_model(keras_model)
    if variant == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([calib[i:i + 1]] for i in range(len(calib)))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return converter.convert()


def tutorial_loop(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    """The seed tutorials' evaluation: one set_tensor / invoke / get_tensor per sample."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model_bytes)
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    outputs = []
    for sample in x:
        if inp["dtype"] != np.float32:
            scale, zero_point = inp["quantization"]
            sample = measure.quantize_input(sample, inp["dtype"], scale, zero_point)
        interpreter.set_tensor(inp["index"], np.expand_dims(sample, axis=0).astype(inp["dtype"]))
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(out["index"])[0])
    result = np.array(outputs)
    if out["dtype"] != np.float32:
        scale, zero_point = out["quantization"]
        result = measure.dequantize_output(result, scale, zero_point)
    return result.reshape(len(x), -1)


class CpuWatch:
    """CPU share used by other processes while a block runs (0.0 = this process had the machine)."""

    def __enter__(self) -> "CpuWatch":
        self._busy0, self._own0, self._t0 = self._busy(), self._own(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._t0
        others = (self._busy() - self._busy0) - (self._own() - self._own0)
        self.others = max(0.0, others / (wall * (os.cpu_count() or 1)))
        self.seconds = wall

    @staticmethod
    def _busy() -> float:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    args = parser.parse_args()

    dataset = load_digits(28)
    reps = -(-args.samples // len(dataset.x_test))
    x = np.tile(dataset.x_test, (reps, 1, 1))[: args.samples]
    print(f"digits-28 test split ({len(dataset.x_test)} samples) tiled to {len(x)}; "
          f"{measure.available_cores()} cores; best of {args.repeats}; "
          f"load average before: {os.getloadavg()[0]:.2f}", flush=True)

    rows = []
    for name in args.models:
        keras_model = build_model(name, dataset.input_shape, dataset.num_classes, seed=0)
        for variant in VARIANTS:
            model_bytes = convert(keras_model, variant, dataset.x_calib[:100])
            loop_times, ql_times, ql_others = [], [], []
            for _ in range(args.repeats):
                start = time.perf_counter()
                reference = tutorial_loop(model_bytes, x)
                loop_times.append(time.perf_counter() - start)
                with CpuWatch() as watch:
                    outputs, plan = measure.predict_tflite_with_plan(model_bytes, x)
                ql_times.append(watch.seconds)
                ql_others.append(watch.others)
                if not np.array_equal(outputs, reference):
                    raise SystemExit(f"{name} {variant}: outputs differ from the per-image loop "
                                     f"(predictions equal: "
                                     f"{np.array_equal(outputs.argmax(1), reference.argmax(1))})")
            best = int(np.argmin(ql_times))
            rows.append((name, variant, min(loop_times), ql_times[best], plan, ql_others[best]))
            print(f"  {name} {variant}: loop {min(loop_times):.3f} s, quantlab {ql_times[best]:.3f} s",
                  flush=True)

    print()
    header = (f"{'model':<10} {'variant':<8} {'loop s':>8} {'quantlab s':>10} {'speed-up':>8} "
              f"{'batch':>5} {'workers':>7} {'probe us/sample (b1/b8/b32)':>28} {'others':>6}  same")
    print(header)
    print("-" * len(header))
    failures = []
    for name, variant, loop_s, ql_s, plan, others in rows:
        speedup = loop_s / ql_s
        probe = "-"
        if plan.probe:
            probe = "/".join("x" if v is None else f"{v * 1e6:.1f}"
                             for v in plan.probe.seconds_per_sample.values())
        print(f"{name:<10} {variant:<8} {loop_s:>8.3f} {ql_s:>10.3f} {speedup:>7.2f}x "
              f"{plan.batch_size:>5} {plan.workers:>7} {probe:>28} {others:>5.0%}  yes")
        if speedup < GOAL_NEVER_SLOWER:
            failures.append(f"{name} {variant} slower than the loop ({speedup:.2f}x)")
        if name == "mobilenet" and speedup < GOAL_MOBILENET:
            failures.append(f"mobilenet {variant} below {GOAL_MOBILENET}x ({speedup:.2f}x)")
    print()
    print(f"goals: never slower than the loop; mobilenet >= {GOAL_MOBILENET}x on "
          f"{measure.available_cores()} cores -> " + ("MET" if not failures else "MISSED: " + "; ".join(failures)))
    return 1 if failures and args.strict else 0


if __name__ == "__main__":
    raise SystemExit(main())
