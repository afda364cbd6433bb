"""Measure a .tflite model given as bytes: outputs and accuracy, size, latency, and what runs in float.

Only numpy, the standard library and LiteRT (`ai_edge_litert`, imported inside the functions) are used:
no TensorFlow, no Streamlit, so a measurement process starts fast and stays small.

Evaluation (`predict_tflite`) is built on three facts measured on the 2-core machines QuantLab runs on
(see `benchmarks/bench_evaluate.py`):

- LiteRT's `Interpreter.invoke()` releases the GIL (a pure-Python loop in the main thread finishes while
  one long `invoke()` is still running in another thread), so interpreters in threads run in parallel.
  The per-sample Python work around `invoke()` (set_tensor / get_tensor) holds the GIL, so threads only
  pay off when that work is small next to `invoke()`.
- Neither per-sample invocation nor batching is always faster, and large batches can be slow (the
  GUIDE: the seed CNN took 0.13 s for 10,000 samples one at a time and 1.8 s as one batch). Measured
  here (us/sample at batch 1 / 8 / 32): seed CNN 28x28 float32 11.3 / 6.5 / 6.4, MLP int8 4.3 / 1.0 /
  0.5, built-in MobileNet float32 35.3 / 28.9 / 31.2; on an earlier revision of that MobileNet batch 1
  ran at 97 and batch 128 at 216. So the batch size is chosen per model by a short probe
  (`probe_batch_size`) among PROBE_BATCH_SIZES, never by a fixed rule.
- Batched outputs were bitwise equal to per-sample outputs on every model tried (float32, dynamic
  range, int8, 16x8), and the probe checks this again on the model at hand: a batch size is only used
  when its outputs on the probe samples are bitwise equal to the per-sample outputs.
"""

from __future__ import annotations

import gc
import gzip
import itertools
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .config import MeasureSettings
from .errors import DatasetError, ModelError

# Batch sizes the probe tries; 1 (one invoke per sample, the reference) is always among them.
PROBE_BATCH_SIZES = (1, 8, 32)
# Samples the probe runs each candidate on (outputs of the batch-1 run are kept, not thrown away).
PROBE_SAMPLES = 128
# Each candidate runs over the probe samples until it has taken this long, at most PROBE_MAX_PASSES times.
PROBE_MIN_SECONDS = 0.004
PROBE_MAX_PASSES = 3
# Below this many samples the probe would cost more than it can save: batch 1 is used.
PROBE_MIN_SAMPLES = 4 * PROBE_SAMPLES
# With workers=None, each worker thread gets at least this many samples (an interpreter costs ~1 ms).
MIN_SAMPLES_PER_WORKER = 256
# With workers=None, a model the probe runs one sample at a time faster than this gets one worker:
# the GIL-held Python work around each invoke() then dominates and threads contend for the GIL
# (seed CNN 28x28, float32, batch 1: 0.15 s for 10,000 samples on one thread, 0.23 s on two).
MIN_PARALLEL_SECONDS_PER_SAMPLE = 20e-6
# samples_ms keeps at most this many timings (evenly spaced); the statistics use every timed run.
MAX_KEPT_LATENCY_SAMPLES = 1000

LATENCY_METHOD = (
    "Latency is the wall-clock time of one LiteRT Interpreter.invoke() on a single sample (batch 1), "
    "measured with time.perf_counter() around invoke() only: the input is set once before timing and "
    "the output is not read. The interpreter uses the measurement settings' thread count and LiteRT's "
    "default CPU kernels (the XNNPACK delegate where it supports the model). The warm-up runs are not "
    "timed; then invoke() is timed until at least the minimum number of runs and at least the minimum "
    "seconds are reached, with Python's garbage collector paused. p50 and p90 are percentiles with "
    "linear interpolation, mean and std (sample standard deviation) are over every timed run. "
    "Timings are from this machine and include interference from anything else running on it: "
    "others_cpu_share is the share of the machine's CPU that other processes used meanwhile. On the "
    "2-core development machines the same invoke() ran about 1.5x slower in CPU time, not only in wall "
    "time, while the other core was busy, so compare latencies measured on a quiet machine."
)

_INT_DTYPES = (np.int8, np.uint8, np.int16)

# Ops that keep state in variable tensors from one invoke() to the next. A fused LSTM keeps its
# hidden and cell state: on a stateless Keras LSTM classifier, outputs of a second sample differed
# from Keras by up to 0.047 (3% of top-1 classes) until the variables were reset before each invoke,
# after which they matched to 6e-8. Samples are independent, so these models are reset every time.
STATEFUL_OPS = frozenset({"UNIDIRECTIONAL_SEQUENCE_LSTM", "BIDIRECTIONAL_SEQUENCE_LSTM",
                          "UNIDIRECTIONAL_SEQUENCE_RNN", "BIDIRECTIONAL_SEQUENCE_RNN", "LSTM", "SVDF"})


def keeps_state(interpreter: Any) -> bool:
    """Whether the model has ops that carry state between invokes (see STATEFUL_OPS)."""
    try:
        return any(str(op["op_name"]) in STATEFUL_OPS for op in interpreter._get_ops_details())
    except Exception:  # noqa: BLE001 - a private API; without it, assume stateless as before
        return False


def _invalid_model(reason: Any) -> ModelError:
    text = " ".join(str(reason).split())[:300] or type(reason).__name__
    return ModelError(f"the model is not a valid TensorFlow Lite model: {text}; "
                      f"re-export it with TFLiteConverter")


def _cannot_run(reason: Any) -> ModelError:
    text = " ".join(str(reason).split())[:300] or type(reason).__name__
    return ModelError(f"LiteRT could not run the model: {text}; check the conversion settings "
                      f"(for example 16x8 quantization of an untrained model) and re-export it")


def create_interpreter(model_bytes: bytes, num_threads: int = 1, *, resolver: str = "default") -> Any:
    """A LiteRT Interpreter for `model_bytes`, tensors allocated.

    `resolver="default"` applies LiteRT's default delegate (XNNPACK) as deployments do;
    `resolver="plain"` keeps the model's own operator graph (used for inspection).
    Raises ModelError when the bytes are not a loadable TensorFlow Lite model.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    if not isinstance(model_bytes, (bytes, bytearray, memoryview)) or len(model_bytes) == 0:
        raise _invalid_model("no model bytes were given")
    op_resolver = (OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES if resolver == "plain"
                   else OpResolverType.AUTO)
    try:
        interpreter = Interpreter(model_content=bytes(model_bytes), num_threads=int(num_threads),
                                  experimental_op_resolver_type=op_resolver)
    except Exception as exc:  # noqa: BLE001 - LiteRT raises ValueError, RuntimeError, UnicodeDecodeError
        raise _invalid_model(exc) from None
    try:
        interpreter.allocate_tensors()
    except Exception as exc:  # noqa: BLE001 - a kernel's Prepare failing, in whatever type LiteRT uses
        raise _cannot_run(exc) from None
    return interpreter


@dataclass(frozen=True)
class _Signature:
    """The single input and the (first) output of a model, as evaluation needs them."""

    input_index: int
    input_dtype: np.dtype
    sample_shape: tuple[int, ...]  # input shape without the batch dimension
    input_scale: float
    input_zero_point: int
    output_index: int
    output_dtype: np.dtype
    output_scale: float
    output_zero_point: int


def _signature(interpreter: Any) -> _Signature:
    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    if len(inputs) != 1 or not outputs:
        raise ModelError(f"the model has {len(inputs)} inputs and {len(outputs)} outputs; QuantLab "
                         f"evaluates classifiers with one image input and one output")
    inp, out = inputs[0], outputs[0]
    in_scale, in_zp = inp["quantization"]
    out_scale, out_zp = out["quantization"]
    return _Signature(
        input_index=int(inp["index"]), input_dtype=np.dtype(inp["dtype"]),
        sample_shape=tuple(int(d) for d in inp["shape"][1:]),
        input_scale=float(in_scale), input_zero_point=int(in_zp),
        output_index=int(out["index"]), output_dtype=np.dtype(out["dtype"]),
        output_scale=float(out_scale), output_zero_point=int(out_zp),
    )


def quantize_input(x: np.ndarray, dtype: np.dtype, scale: float, zero_point: int) -> np.ndarray:
    """Float values to a LiteRT integer tensor: round(x / scale) + zero_point, clipped to the dtype.

    Rounds half away from zero like LiteRT's own QUANTIZE kernel. A scale of 0 (an integer input that
    is not quantized) only rounds and clips. Works in float32 (exact for int8/uint8/int16 values).
    """
    dtype = np.dtype(dtype)
    v = np.array(x, dtype=np.float32)  # a copy: the steps below work in place
    if scale:
        v /= np.float32(scale)
    v += np.copysign(np.float32(0.5), v)
    np.trunc(v, out=v)
    v += np.float32(zero_point)
    info = np.iinfo(dtype)
    np.clip(v, info.min, info.max, out=v)
    return v.astype(dtype)


def dequantize_output(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """A LiteRT integer tensor to float32: (q - zero_point) * scale (a scale of 0 only casts)."""
    if not scale:
        return np.asarray(q).astype(np.float32)
    values = np.asarray(q).astype(np.float32) - np.float32(zero_point)
    return (values * np.float32(scale)).astype(np.float32)


def _shape_inputs(x: Any, sig: _Signature) -> np.ndarray:
    """Samples (N, ...) reshaped to (N, *sample_shape); values are converted later, per chunk."""
    x = np.asarray(x)
    per_sample = int(np.prod(sig.sample_shape, dtype=np.int64))
    if x.ndim == 0:
        raise DatasetError("a single number is not a batch of samples; pass an array (N, ...)")
    if len(x) == 0:
        return np.zeros((0, *sig.sample_shape), np.float32)
    sample_size = int(np.prod(x.shape[1:], dtype=np.int64))
    if sample_size != per_sample:
        raise DatasetError(f"samples of shape {tuple(x.shape[1:])} ({sample_size} values) do not fit "
                           f"the model input {list(sig.sample_shape)} ({per_sample} values); resize the "
                           f"dataset to the model's input shape")
    return x.reshape((x.shape[0], *sig.sample_shape))


def _to_input_dtype(x: np.ndarray, sig: _Signature) -> np.ndarray:
    """Float samples to the input tensor's dtype, quantizing for integer inputs."""
    if sig.input_dtype.type in _INT_DTYPES:
        return quantize_input(x, sig.input_dtype, sig.input_scale, sig.input_zero_point)
    return np.asarray(x, dtype=sig.input_dtype)


def _raw_to_float(raw: np.ndarray, sig: _Signature) -> np.ndarray:
    raw = raw.reshape(raw.shape[0], -1)
    if sig.output_dtype.kind in "iu":
        return dequantize_output(raw, sig.output_scale, sig.output_zero_point)
    return raw.astype(np.float32, copy=False)


def _run(model_bytes: bytes, xq: np.ndarray, batch: int, num_threads: int,
         interpreter: Any = None) -> np.ndarray:
    """Raw outputs (n, *output sample shape) of float samples `xq` (n, *sample_shape) run in batches of
    `batch` on one interpreter.

    The last batch is padded with zeros so the interpreter is allocated once; padded rows are dropped.
    """
    interp = interpreter if interpreter is not None else create_interpreter(model_bytes, num_threads)
    sig = _signature(interp)
    n = len(xq)
    try:
        if int(interp.get_input_details()[0]["shape"][0]) != batch:
            interp.resize_tensor_input(sig.input_index, [batch, *sig.sample_shape])
            interp.allocate_tensors()
        n_batches = -(-n // batch)
        padded = np.zeros((n_batches * batch, *sig.sample_shape), sig.input_dtype)
        padded[:n] = _to_input_dtype(xq, sig)  # quantized here, in the worker thread (numpy drops the GIL)
        xb = padded.reshape((n_batches, batch, *sig.sample_shape))
        # Output shapes of models with shape-computing ops are only known after an invoke().
        interp.set_tensor(sig.input_index, xb[0])
        interp.reset_all_variables()
        interp.invoke()
        first = interp.get_tensor(sig.output_index)
        if first.shape[0] != batch:
            raise ModelError(f"the model's output has batch dimension {first.shape[0]} for {batch} "
                             f"inputs; evaluate it with batch_size=1")
        out = np.empty((n_batches * batch, *first.shape[1:]), first.dtype)
        out[:batch] = first
        # tensor() views copy straight into and out of the interpreter's buffers: a third less
        # GIL-held Python time per invoke() than set_tensor / get_tensor. Each view is dropped at
        # the end of its statement, as invoke() requires.
        input_view, output_view, invoke = (interp.tensor(sig.input_index),
                                           interp.tensor(sig.output_index), interp.invoke)
        if keeps_state(interp):
            reset, plain_invoke = interp.reset_all_variables, invoke

            def invoke() -> None:
                reset()
                plain_invoke()
        for k in range(1, n_batches):
            input_view()[...] = xb[k]
            invoke()
            out[k * batch:(k + 1) * batch] = output_view()
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - RuntimeError from a kernel, ValueError from resize
        raise _cannot_run(exc) from None
    return out[:n]


@dataclass(frozen=True)
class ProbeResult:
    """What the probe measured: the chosen batch size and seconds per sample of each candidate.

    `seconds_per_sample[b]` is None for a candidate that failed or whose outputs were not bitwise
    equal to batch 1's (such a candidate is never chosen).
    """

    batch_size: int
    samples: int
    seconds_per_sample: dict[int, float | None]

    def to_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "samples": self.samples,
                "seconds_per_sample": {str(k): v for k, v in self.seconds_per_sample.items()}}


def _probe(model_bytes: bytes, xq: np.ndarray, num_threads: int) -> tuple[ProbeResult, np.ndarray]:
    """Time each candidate batch size on the same samples; return the result and batch 1's outputs."""
    timings: dict[int, float | None] = {}
    reference = None
    for batch in PROBE_BATCH_SIZES:
        if batch > len(xq):
            continue
        try:
            interp = create_interpreter(model_bytes, num_threads)
            _run(model_bytes, xq[:batch], batch, num_threads, interpreter=interp)  # warm-up, resize
            # Best of up to PROBE_MAX_PASSES passes, stopping once a candidate has run for
            # PROBE_MIN_SECONDS: one pass on a large model, several on a tiny one whose single pass
            # lasts about a millisecond and is at the mercy of the scheduler.
            passes: list[float] = []
            while len(passes) < PROBE_MAX_PASSES and sum(passes) < PROBE_MIN_SECONDS:
                start = time.perf_counter()
                raw = _run(model_bytes, xq, batch, num_threads, interpreter=interp)
                passes.append(time.perf_counter() - start)
            elapsed = min(passes)
        except ModelError:
            if batch == 1:
                raise
            timings[batch] = None
            continue
        if batch == 1:
            reference = raw
        elif not np.array_equal(raw, reference):
            timings[batch] = None
            continue
        timings[batch] = elapsed / len(xq)
    usable = {b: t for b, t in timings.items() if t is not None}
    best = min(usable, key=lambda b: (usable[b], b))
    assert reference is not None
    return ProbeResult(best, len(xq), timings), reference


def probe_batch_size(model_bytes: bytes, x: Any, *, num_threads: int = 1) -> ProbeResult:
    """Measure which of PROBE_BATCH_SIZES evaluates this model fastest on the first PROBE_SAMPLES of x.

    `predict_tflite` does this itself when batch_size is None; call it to see (and record) the choice.
    """
    sig = _signature(create_interpreter(model_bytes, num_threads))
    xq = _shape_inputs(x, sig)[:PROBE_SAMPLES]
    if len(xq) == 0:
        raise DatasetError("no samples to probe; pass at least one sample")
    return _probe(model_bytes, xq, num_threads)[0]


EVALUATION_CORES_ENV = "QUANTLAB_EVALUATION_CORES"  # set by WorkerPool: its share of the cores


def available_cores() -> int:
    """Cores this process may run on (the affinity mask where the OS has one, else os.cpu_count())."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def evaluation_cores() -> int:
    """Threads the evaluator may use: the available cores, or this worker's share of them when a
    pool runs several workers side by side (so that they do not fight over the same cores)."""
    cores = available_cores()
    try:
        share = int(os.environ.get(EVALUATION_CORES_ENV, ""))
    except ValueError:
        return cores
    return max(1, min(cores, share))


@dataclass(frozen=True)
class EvalPlan:
    """How predict_tflite ran: batch size, worker threads, and the probe that chose the batch size."""

    batch_size: int
    workers: int
    samples: int
    probe: ProbeResult | None

    def to_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "workers": self.workers, "samples": self.samples,
                "probe": self.probe.to_dict() if self.probe else None}


def predict_tflite(model_bytes: bytes, x: Any, *, num_threads: int = 1, workers: int | None = None,
                   batch_size: int | None = None) -> np.ndarray:
    """Float32 outputs (N, C) of the model for float samples `x` (N, ...); see predict_tflite_with_plan."""
    return predict_tflite_with_plan(model_bytes, x, num_threads=num_threads, workers=workers,
                                    batch_size=batch_size)[0]


def predict_tflite_with_plan(model_bytes: bytes, x: Any, *, num_threads: int = 1,
                             workers: int | None = None, batch_size: int | None = None
                             ) -> tuple[np.ndarray, EvalPlan]:
    """Float32 outputs (N, C) of the model for float samples `x` (N, ...), and how they were computed.

    Integer inputs (int8 / uint8 / int16) are quantized with the input tensor's (scale, zero_point),
    rounding and clipping; integer outputs are dequantized with the output's. Samples are reshaped to
    the model's input shape when the number of values matches, so (N, H, W) data runs on a (1, H, W, 1)
    input. Only the model's first output is returned.

    The samples are split into `workers` contiguous chunks, each run by its own Interpreter in a thread
    (`invoke()` releases the GIL). `workers=None` uses every available core, with at least
    MIN_SAMPLES_PER_WORKER samples per worker, and one worker for a model the probe found fastest at
    batch 1 and faster than MIN_PARALLEL_SECONDS_PER_SAMPLE per sample. `batch_size=None` lets a probe
    on the first PROBE_SAMPLES samples choose among PROBE_BATCH_SIZES (no probe, batch 1, below
    PROBE_MIN_SAMPLES samples). The outputs equal a per-sample loop's: a batch size is only chosen when
    its outputs on the probe samples are bitwise equal to batch 1's. When several processes evaluate at
    once, pass workers=1 to each so that they do not oversubscribe the cores.
    """
    if workers is not None and workers < 1:
        raise ValueError("workers must be at least 1")
    if batch_size is not None and batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    interp = create_interpreter(model_bytes, num_threads)
    sig = _signature(interp)
    xq = _shape_inputs(x, sig)
    n = len(xq)
    if n == 0:
        out_shape = interp.get_output_details()[0]["shape"][1:]
        empty = np.zeros((0, int(np.prod(out_shape, dtype=np.int64))), np.float32)
        return empty, EvalPlan(batch_size or 1, 0, 0, None)

    parts: list[np.ndarray] = []
    start = 0
    probe = None
    if batch_size is None:
        if n >= PROBE_MIN_SAMPLES:
            probe, reference = _probe(model_bytes, xq[:PROBE_SAMPLES], num_threads)
            batch_size, start = probe.batch_size, PROBE_SAMPLES
            parts.append(reference)
        else:
            batch_size = 1

    rest = xq[start:]
    if workers is None:
        workers = min(evaluation_cores(), max(1, len(rest) // MIN_SAMPLES_PER_WORKER))
        if (probe is not None and probe.batch_size == 1
                and (probe.seconds_per_sample[1] or 0.0) < MIN_PARALLEL_SECONDS_PER_SAMPLE):
            workers = 1
    workers = max(1, min(workers, len(rest)))
    chunks: list[np.ndarray] = []
    if len(rest):
        bounds = np.linspace(0, len(rest), workers + 1).astype(int)
        chunks = [rest[a:b] for a, b in itertools.pairwise(bounds) if b > a]
        if len(chunks) == 1:
            parts.append(_run(model_bytes, chunks[0], batch_size, num_threads))
        else:
            with ThreadPoolExecutor(max_workers=len(chunks), thread_name_prefix="quantlab-eval") as pool:
                futures = [pool.submit(_run, model_bytes, c, batch_size, num_threads) for c in chunks]
                parts.extend(f.result() for f in futures)
    plan = EvalPlan(batch_size=batch_size, workers=max(1, len(chunks)), samples=n, probe=probe)
    return _raw_to_float(np.concatenate(parts), sig), plan


# --- metrics --------------------------------------------------------------------------------------


def _check_lengths(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if len(a) != len(b):
        raise DatasetError(f"{len(a)} outputs but {len(b)} {what}; pass one per sample")
    if len(a) == 0:
        raise DatasetError(f"no outputs to compare with {what}")


def accuracy(outputs: Any, labels: Any) -> float:
    """Share of samples whose top-1 class (argmax of the outputs) equals the label."""
    outputs, labels = np.asarray(outputs), np.asarray(labels).reshape(-1)
    _check_lengths(outputs, labels, "labels")
    return float(np.mean(outputs.reshape(len(outputs), -1).argmax(axis=1) == labels))


def agreement(outputs: Any, reference_outputs: Any) -> float:
    """Share of samples whose top-1 class equals the reference model's top-1 class."""
    outputs, reference = np.asarray(outputs), np.asarray(reference_outputs)
    _check_lengths(outputs, reference, "reference outputs")
    top = outputs.reshape(len(outputs), -1).argmax(axis=1)
    ref_top = reference.reshape(len(reference), -1).argmax(axis=1)
    return float(np.mean(top == ref_top))


def sqnr_db(outputs: Any, reference: Any) -> float | None:
    """Signal-to-quantization-noise ratio in dB: 10 * log10(sum(reference^2) / sum((out - ref)^2)).

    Returns None when it is undefined: when the outputs equal the reference exactly (no noise: an
    infinite SQNR; show it as "identical") or when the reference is all zeros (no signal). Computed in
    float64 over every output value.
    """
    out = np.asarray(outputs, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if out.shape != ref.shape:
        raise DatasetError(f"outputs of shape {out.shape} cannot be compared with a reference of "
                           f"shape {ref.shape}; evaluate both on the same samples")
    signal = float(np.sum(ref * ref))
    noise = float(np.sum((out - ref) ** 2))
    if noise == 0.0 or signal == 0.0:
        return None
    return 10.0 * math.log10(signal / noise)


# --- size -----------------------------------------------------------------------------------------


def gzip_size(data: bytes) -> int:
    """Bytes of `data` gzipped at level 9 with mtime 0 (deterministic: equal input, equal size)."""
    return len(gzip.compress(bytes(data), compresslevel=9, mtime=0))


# --- latency --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyStats:
    """Batch-1 invoke() latency; see LATENCY_METHOD. `samples_ms` holds at most
    MAX_KEPT_LATENCY_SAMPLES timings (evenly spaced over the run); the statistics use all `runs`."""

    p50_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    runs: int
    seconds: float
    num_threads: int
    warmup_runs: int
    samples_ms: tuple[float, ...]
    # Share of the machine's CPU time used by other processes while timing (0.5 = one of two cores);
    # None where the OS does not tell (no /proc/stat). See LATENCY_METHOD.
    others_cpu_share: float | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["samples_ms"] = list(self.samples_ms)
        return data


def _one_sample(sample: Any, sig: _Signature) -> np.ndarray:
    sample = np.asarray(sample)
    per_sample = int(np.prod(sig.sample_shape, dtype=np.int64))
    if sample.size == 0 or sample.size % per_sample:
        raise DatasetError(f"a sample of shape {tuple(sample.shape)} does not fit the model input "
                           f"{list(sig.sample_shape)}; pass one sample of the model's input shape")
    first = _shape_inputs(sample.reshape(-1, *sig.sample_shape)[:1], sig)
    return np.ascontiguousarray(_to_input_dtype(first, sig))


DEFAULT_MEASURE_SETTINGS = MeasureSettings()


def measure_latency(model_bytes: bytes, sample: Any,
                    settings: MeasureSettings = DEFAULT_MEASURE_SETTINGS) -> LatencyStats:
    """Time invoke() on one sample (batch 1) as described in LATENCY_METHOD."""
    interp = create_interpreter(model_bytes, settings.num_threads)
    sig = _signature(interp)
    interp.set_tensor(sig.input_index, _one_sample(sample, sig))
    return _time_invokes(interp, settings)


def _time_invokes(interp: Any, settings: MeasureSettings) -> LatencyStats:
    """Warm up, then time invoke() on the inputs already set (see LATENCY_METHOD)."""
    invoke, clock = interp.invoke, time.perf_counter
    # A model that keeps state is reset before each run, outside the timed span (see STATEFUL_OPS).
    reset = interp.reset_all_variables if keeps_state(interp) else (lambda: None)
    min_runs, min_seconds = max(1, int(settings.min_runs)), float(settings.min_seconds)
    times: list[float] = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(int(settings.warmup_runs)):
            reset()
            invoke()
        busy0, own0 = _machine_busy_seconds(), _own_cpu_seconds()
        start = clock()
        while len(times) < min_runs or clock() - start < min_seconds:
            reset()
            t0 = clock()
            invoke()
            times.append(clock() - t0)
        seconds = clock() - start
        busy1, own1 = _machine_busy_seconds(), _own_cpu_seconds()
    except Exception as exc:  # noqa: BLE001 - a kernel failing in invoke()
        raise _cannot_run(exc) from None
    finally:
        if gc_was_enabled:
            gc.enable()
    ms = np.asarray(times) * 1e3
    if len(ms) > MAX_KEPT_LATENCY_SAMPLES:
        kept = ms[np.linspace(0, len(ms) - 1, MAX_KEPT_LATENCY_SAMPLES).round().astype(int)]
    else:
        kept = ms
    return LatencyStats(
        p50_ms=float(np.percentile(ms, 50)), p90_ms=float(np.percentile(ms, 90)),
        mean_ms=float(ms.mean()), std_ms=float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,
        runs=len(ms), seconds=seconds, num_threads=int(settings.num_threads),
        warmup_runs=int(settings.warmup_runs), samples_ms=tuple(float(v) for v in kept),
        others_cpu_share=_others_share(busy0, busy1, own1 - own0, seconds),
    )


def _machine_busy_seconds() -> float | None:
    """CPU seconds all processes have used since boot (Linux /proc/stat), None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
        return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # less idle, iowait
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _others_share(busy0: float | None, busy1: float | None, own: float, seconds: float) -> float | None:
    if busy0 is None or busy1 is None or seconds <= 0:
        return None
    share = (busy1 - busy0 - own) / (seconds * (os.cpu_count() or 1))
    return round(min(1.0, max(0.0, share)), 3)


# --- inspection -----------------------------------------------------------------------------------

_CONVERSION_OPS = frozenset({"QUANTIZE", "DEQUANTIZE"})


@dataclass(frozen=True)
class TfliteInspection:
    """The model's inputs, outputs and operators as stored in the file (before any delegate).

    An op `computes_in_float` when one of its outputs is a float tensor and it is not a QUANTIZE or
    DEQUANTIZE conversion; `float_ops` counts such ops (a dynamic-range op, int8 weights with float
    activations, counts as float). A convolution or fully connected op with integer weights records
    `weight_scales`: one per output channel (per-channel) or 1 (per-tensor).
    """

    inputs: tuple[dict[str, Any], ...]
    outputs: tuple[dict[str, Any], ...]
    ops: tuple[dict[str, Any], ...]
    float_ops: int
    total_ops: int

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": [dict(d) for d in self.inputs], "outputs": [dict(d) for d in self.outputs],
                "ops": [dict(d) for d in self.ops], "float_ops": self.float_ops,
                "total_ops": self.total_ops, "weight_granularity": self.weight_granularity}

    @property
    def weight_granularity(self) -> str | None:
        """"per-channel", "per-tensor", "mixed", or None when no weights are integer."""
        kinds = {"per-tensor" if op["weight_scales"] == 1 else "per-channel"
                 for op in self.ops if op.get("weight_scales") and op.get("weight_channels", 2) > 1}
        return None if not kinds else kinds.pop() if len(kinds) == 1 else "mixed"

    @property
    def op_counts(self) -> dict[str, int]:
        """Number of ops per op name, in first-seen order."""
        counts: dict[str, int] = {}
        for op in self.ops:
            counts[op["op_name"]] = counts.get(op["op_name"], 0) + 1
        return counts


def _dtype_name(dtype: Any) -> str:
    return np.dtype(dtype).name


def _io_dict(detail: dict[str, Any]) -> dict[str, Any]:
    scale, zero_point = detail["quantization"]
    quantized = bool(scale)
    return {"name": str(detail["name"]), "dtype": _dtype_name(detail["dtype"]),
            "shape": [int(d) for d in detail["shape"]],
            "scale": float(scale) if quantized else None,
            "zero_point": int(zero_point) if quantized else None}


_WEIGHTED_OPS = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV",
                           "CONV_3D"})


def _weight_scales(op: dict[str, Any], tensors: dict[int, dict[str, Any]]) -> tuple[int, int] | None:
    """(scales, output channels) of the op's integer weights; None when they are float or absent.

    A kernel with one output channel has one scale either way: granularity cannot be told from it.
    """
    inputs = list(op.get("inputs", []))
    if op["op_name"] not in _WEIGHTED_OPS or len(inputs) < 2 or inputs[1] not in tensors:
        return None
    weights = tensors[inputs[1]]
    if not np.issubdtype(weights["dtype"], np.integer):
        return None
    quantization = weights.get("quantization_parameters", {})
    scales = len(quantization.get("scales", ()))
    if not scales:
        return None
    shape = list(weights.get("shape", ()))
    axis = int(quantization.get("quantized_dimension", 0))
    if op["op_name"] == "DEPTHWISE_CONV_2D":
        axis = len(shape) - 1  # (1, H, W, channels): per-channel scales run along the last axis
    channels = int(shape[axis]) if 0 <= axis < len(shape) else scales
    return scales, channels


def _stored_kernels(op_details: list[dict], tensors: dict[int, dict[str, Any]]) -> dict[int, tuple[str, int]]:
    """For each weighted op (by index): its kernel's dtype as stored in the file and its number of values.

    A kernel is a tensor no op computes, or the output of a DEQUANTIZE of such a tensor (weight-only
    and float16 files store it small and widen it at run time); a kernel some other op computes is
    an activation, not a weight, and is left out.
    """
    made_by = {int(out): op for op in op_details for out in op.get("outputs", [])}
    kernels = {}
    for op in op_details:
        inputs = list(op.get("inputs", []))
        if str(op["op_name"]) not in _WEIGHTED_OPS or len(inputs) < 2 or inputs[1] not in tensors:
            continue
        stored, maker = inputs[1], made_by.get(int(inputs[1]))
        if maker is not None:
            maker_inputs = list(maker.get("inputs", []))
            if str(maker["op_name"]) != "DEQUANTIZE" or not maker_inputs or int(maker_inputs[0]) in made_by:
                continue
            stored = maker_inputs[0]
        tensor = tensors[int(stored)]
        kernels[int(op["index"])] = (_dtype_name(tensor["dtype"]), int(np.prod(tensor.get("shape", ()))))
    return kernels


def _read_graph(model_bytes: bytes) -> tuple[Any, list[dict], dict[int, dict[str, Any]]]:
    """The file's interpreter (no delegate), its ops and its tensors by index, without invoking it."""
    interp = create_interpreter(model_bytes, resolver="plain")
    try:
        op_details = interp._get_ops_details()  # LiteRT 2.x: index, op_name, operand/result types
        tensors = {int(d["index"]): d for d in interp.get_tensor_details()}
    except Exception as exc:  # noqa: BLE001 - a private API: any failure means a model it cannot read
        raise _invalid_model(exc) from None
    return interp, op_details, tensors


def int16_abort_reason(model_bytes: bytes) -> str | None:
    """Why LiteRT would abort the process at this int16x8 file's first invoke, or None.

    LiteRT 2.3's 16-bit SUB kernel aborts (SIGABRT in QuantizeMultiplierSmallerThanOneExp, no message)
    when an input's quantization scale is 0: a constant of zeros, as tf_keras's LayerNormalization
    makes, or a zero-initialised weight minus x. Read from the file without invoking it.
    """
    _, op_details, tensors = _read_graph(model_bytes)
    for op in op_details:
        if str(op["op_name"]) != "SUB":
            continue
        for index in op.get("inputs", []):
            tensor = tensors.get(int(index))
            scales = (tensor or {}).get("quantization_parameters", {}).get("scales", ())
            if tensor is not None and np.dtype(tensor["dtype"]) == np.int16 and len(scales) \
                    and not np.any(scales):
                return (f"op SUB has the 16-bit input {str(tensor['name'])[:80]!r} with quantization "
                        f"scale 0 (a constant of zeros), which aborts LiteRT's 16-bit SUB kernel at the "
                        f"first invoke (SIGABRT)")
    return None


def inspect_tflite(model_bytes: bytes) -> TfliteInspection:
    """Inputs, outputs and per-op dtypes of the model's own graph (XNNPACK not applied)."""
    interp, op_details, tensors = _read_graph(model_bytes)
    kernels = _stored_kernels(op_details, tensors)
    ops = []
    for op in op_details:
        name = str(op["op_name"])
        outs = [_dtype_name(t) for t in op.get("result_types", [])]
        ops.append({
            "index": int(op["index"]), "op_name": name,
            "input_dtypes": [_dtype_name(t) for t in op.get("operand_types", [])],
            "output_dtypes": outs,
            "computes_in_float": name not in _CONVERSION_OPS and any(d.startswith("float") for d in outs),
        })
        weights = _weight_scales({**op, "op_name": name}, tensors)
        ops[-1].update(weight_scales=weights[0] if weights else None,
                       weight_channels=weights[1] if weights else None)
        if int(op["index"]) in kernels:
            ops[-1].update(kernel_dtype=kernels[int(op["index"])][0], kernel_values=kernels[int(op["index"])][1])
    return TfliteInspection(
        inputs=tuple(_io_dict(d) for d in interp.get_input_details()),
        outputs=tuple(_io_dict(d) for d in interp.get_output_details()),
        ops=tuple(ops), float_ops=sum(op["computes_in_float"] for op in ops), total_ops=len(ops),
    )


# --- models with several inputs or outputs ---------------------------------------------------------


def _io_tensors(interp: Any, io: dict) -> tuple[list[tuple[dict, dict]], list[dict]]:
    """Each model input (from `io`, see uploads.model_io_plan) with its TFLite tensor, and the TFLite
    output tensors in the model's output order.

    TFLite orders tensors its own way (inputs and outputs were seen reversed and sorted by name), so
    they are matched by the signature's names, which are the Keras input and output names; outputs
    of a concrete-function conversion are named output_0, output_1, ... in the model's order.
    """
    try:
        runner = interp.get_signature_runner()
        inputs, outputs = runner.get_input_details(), runner.get_output_details()
    except Exception as exc:  # noqa: BLE001 - a model without a signature
        raise _invalid_model(f"no serving signature to match inputs and outputs by name ({exc})") from None
    specs = io.get("inputs") or [{"name": None, "offset": 0, "size": None}]
    matched = []
    for position, spec in enumerate(specs):
        detail = inputs.get(spec["name"]) if spec["name"] else None
        if detail is None:
            detail = inputs.get(f"x_{position}") or (list(inputs.values())[position]
                                                        if len(inputs) == len(specs) == 1 else None)
        if detail is None:
            raise ModelError(f"the .tflite has inputs {', '.join(inputs)}, not {spec['name']!r}; "
                             f"convert the model with its input names")
        matched.append((spec, detail))
    ordered = []
    for position, head in enumerate(io["outputs"]):
        detail = outputs.get(head["name"]) or outputs.get(f"quant_{head['name']}") or \
            outputs.get(f"output_{position}")   # quant_: the output layer of a QAT model
        if detail is None:
            raise ModelError(f"the .tflite has outputs {', '.join(outputs)}, not {head['name']!r}; "
                             f"convert the model with its output names")
        ordered.append(detail)
    return matched, ordered


def _feed_value(values: np.ndarray, detail: dict) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    scale, zero_point = detail["quantization"]
    shaped = np.asarray(values).reshape(tuple(int(d) for d in detail["shape"]))
    if dtype.type in _INT_DTYPES and scale:
        return quantize_input(shaped, dtype, scale, zero_point)
    return np.ascontiguousarray(shaped.astype(dtype))


def _read_output(interp: Any, detail: dict) -> np.ndarray:
    raw = interp.get_tensor(detail["index"])
    scale, zero_point = detail["quantization"]
    if np.dtype(detail["dtype"]).kind in "iu" and scale:
        return dequantize_output(raw, scale, zero_point)
    return raw.astype(np.float32)


def _one_packed_sample(row: np.ndarray, spec: dict) -> np.ndarray:
    if spec.get("size") is None:
        return row
    return row[spec["offset"]:spec["offset"] + spec["size"]]


def predict_tflite_io(model_bytes: bytes, x: Any, io: dict, *, num_threads: int = 1) -> list[np.ndarray]:
    """Float32 outputs, one array per model output (in the model's order), of a model with several
    inputs or outputs, for packed samples x (N, total): one sample per invoke()."""
    interp = create_interpreter(model_bytes, num_threads)
    matched, ordered = _io_tensors(interp, io)
    x = np.asarray(x)
    reset = interp.reset_all_variables if keeps_state(interp) else (lambda: None)
    results: list[list[np.ndarray]] = [[] for _ in ordered]
    try:
        for row in x.reshape(len(x), -1):
            for spec, detail in matched:
                interp.set_tensor(detail["index"], _feed_value(_one_packed_sample(row, spec), detail))
            reset()
            interp.invoke()
            for k, detail in enumerate(ordered):
                results[k].append(_read_output(interp, detail)[0])
    except (ModelError, DatasetError):
        raise
    except Exception as exc:  # noqa: BLE001 - a kernel failing in invoke(), a shape that does not fit
        raise _cannot_run(exc) from None
    return [np.asarray(r, dtype=np.float32) for r in results]


def measure_latency_io(model_bytes: bytes, x: Any, io: dict,
                       settings: MeasureSettings = DEFAULT_MEASURE_SETTINGS) -> LatencyStats:
    """measure_latency for a model with several inputs or outputs: every input set once, from the
    first packed sample, then invoke() timed as described in LATENCY_METHOD."""
    interp = create_interpreter(model_bytes, settings.num_threads)
    matched, _ = _io_tensors(interp, io)
    row = np.asarray(x).reshape(len(x), -1)[0]
    for spec, detail in matched:
        interp.set_tensor(detail["index"], _feed_value(_one_packed_sample(row, spec), detail))
    return _time_invokes(interp, settings)
