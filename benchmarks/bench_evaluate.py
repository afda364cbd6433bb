"""QuantLab's evaluator against the seed tutorials' per-image loop, on 10,000 samples.

For each built-in model (quantlab.workloads.build_model, seeded and untrained: speed and equality do not
depend on training) and each variant (float32; integer-only int8 with int8 input and output), both
evaluators run on the digits-28 test split tiled to 10,000 samples. The baseline is the tutorials' loop:
one quantize (rounding, unlike the tutorials' truncating astype) / set_tensor / invoke / get_tensor per
sample. Both are timed end to end (interpreter creation, quantization and, for QuantLab, the batch-size
probe included), interleaved, best of --repeats; the outputs must be bitwise equal.

The machine is shared: the "others" column is the CPU share used by other processes during the best
loop run / the best QuantLab run (from /proc/stat minus this process's CPU time; 50% = one of two cores),
so a contended run can be told from a slow one. The plan columns (batch, workers, probe) are QuantLab's
choice in its best run.

Goals: QuantLab never slower than the loop; at least 1.5x on mobilenet using both cores.

    .venv/bin/python benchmarks/bench_evaluate.py [--repeats 3] [--samples 10000] [--strict]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Self

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantlab import measure
from quantlab.workloads import build_model, load_digits

MODELS = ("seed-cnn", "mobilenet", "mlp")
VARIANTS = ("float32", "int8")
GOAL_NEVER_SLOWER = 1.0
GOAL_MOBILENET = 1.5
BUSY_SHARE = 0.10  # above this CPU share used by other processes, a row's time reflects their load


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


def invoke_releases_gil(model_bytes: bytes, x: np.ndarray) -> tuple[bool, float, float]:
    """Run one long invoke() (all of x as one batch) in a thread while this thread counts in Python.

    Returns (the count finished while invoke() was still running, invoke seconds, count seconds): a
    held GIL would keep the counting loop from running until invoke() returned.
    """
    import threading

    interpreter = measure.create_interpreter(model_bytes)
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, [len(x), *x.shape[1:]])
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, x.astype(np.float32))
    thread = threading.Thread(target=interpreter.invoke)
    start = time.perf_counter()
    thread.start()
    i = 0
    while i < 2_000_000:
        i += 1
    count_seconds = time.perf_counter() - start
    still_running = thread.is_alive()
    thread.join()
    return still_running, time.perf_counter() - start, count_seconds


class CpuWatch:
    """CPU share used by other processes while a block runs (0.0 = this process had the machine)."""

    def __enter__(self) -> Self:
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
    gil_model: tuple[str, bytes] | None = None
    for name in args.models:
        keras_model = build_model(name, dataset.input_shape, dataset.num_classes, seed=0)
        for variant in VARIANTS:
            model_bytes = convert(keras_model, variant, dataset.x_calib[:100])
            if variant == "float32" and (gil_model is None or name == "mobilenet"):
                gil_model = (name, model_bytes)
            loop_times, loop_others, ql_times, ql_others, plans = [], [], [], [], []
            for _ in range(args.repeats):
                with CpuWatch() as watch:
                    reference = tutorial_loop(model_bytes, x)
                loop_times.append(watch.seconds)
                loop_others.append(watch.others)
                with CpuWatch() as watch:
                    outputs, plan = measure.predict_tflite_with_plan(model_bytes, x)
                ql_times.append(watch.seconds)
                plans.append(plan)
                ql_others.append(watch.others)
                if not np.array_equal(outputs, reference):
                    raise SystemExit(f"{name} {variant}: outputs differ from the per-image loop "
                                     f"(predictions equal: "
                                     f"{np.array_equal(outputs.argmax(1), reference.argmax(1))})")
            best, best_loop = int(np.argmin(ql_times)), int(np.argmin(loop_times))
            rows.append((name, variant, loop_times[best_loop], ql_times[best], plans[best],
                         (loop_others[best_loop], ql_others[best])))
            print(f"  {name} {variant}: loop {min(loop_times):.3f} s, quantlab {ql_times[best]:.3f} s",
                  flush=True)

    if gil_model is not None:  # after the timings: its large batch must not disturb them
        samples = x[:2000]
        released, invoke_s, count_s = invoke_releases_gil(gil_model[1], samples)
        print(f"  GIL check ({gil_model[0]} float32): a Python loop of 2,000,000 steps took "
              f"{count_s:.3f} s and {'finished while' if released else 'waited for'} one invoke() of "
              f"{len(samples)} samples ({invoke_s:.3f} s) in another thread -> invoke() "
              f"{'releases' if released else 'holds'} the GIL", flush=True)

    print()
    header = (f"{'model':<10} {'variant':<8} {'loop s':>8} {'quantlab s':>10} {'speed-up':>8} "
              f"{'batch':>5} {'workers':>7} {'probe us/sample (b1/b8/b32)':>28} {'others':>9}  same")
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
              f"{plan.batch_size:>5} {plan.workers:>7} {probe:>28} "
              f"{f'{others[0]:.0%}/{others[1]:.0%}':>9}  yes")
        busy = f"; others used {max(others):.0%} of the CPU meanwhile" if max(others) > BUSY_SHARE else ""
        if speedup < GOAL_NEVER_SLOWER:
            failures.append(f"{name} {variant} slower than the loop ({speedup:.2f}x{busy})")
        if name == "mobilenet" and speedup < GOAL_MOBILENET:
            failures.append(f"mobilenet {variant} below {GOAL_MOBILENET}x ({speedup:.2f}x{busy})")
    print()
    verdict = "MET" if not failures else "MISSED: " + "; ".join(failures)
    print(f"goals: never slower than the loop; mobilenet >= {GOAL_MOBILENET}x on "
          f"{measure.available_cores()} cores -> {verdict}")
    return 1 if failures and args.strict else 0


if __name__ == "__main__":
    raise SystemExit(main())
