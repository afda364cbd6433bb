"""The converter's post-training quantization family: TFLiteConverter modes, the float baseline, an
uploaded .tflite as it is, and int8 with its most sensitive layers kept float."""

from __future__ import annotations

import re
from typing import Any, Callable

from .errors import TechniqueError
from .keras_convert import PTQ_MODES, WEIGHT_GRANULARITIES, configure_converter  # noqa: F401
from .techniques import BuildContext, Param, Produced, Technique



# --- post-training quantization ---------------------------------------------------------------


def convert_model(context: BuildContext, model: Any, mode: str, *,
                  weights: str = "per-channel") -> tuple[bytes, list[str]]:
    """Convert `model` (a Keras model, or None for the context's own source) in one PTQ mode; the
    .tflite bytes and notes on how (see keras_convert)."""
    converter, notes = context.make_converter(model, mode)
    configure_converter(converter, mode, context.dataset.x_calib, weights=weights,
                        input_dtype=context.manifest.get("input_dtype") or "float32",
                        inputs=(context.manifest.get("io") or {}).get("inputs"))
    try:
        return converter.convert(), notes
    except Exception as error:  # noqa: BLE001 - ConverterError, ValueError, RuntimeError...
        raise converter_failure(mode, error) from None


_QUOTED_OP = re.compile(r"op[:\s]+'([^']+)'|'(tf\.[A-Za-z0-9_]+)'")


def converter_failure(mode: str, error: BaseException) -> TechniqueError:
    """The converter's many-line failure as one line naming the op, and what to try instead."""
    text = " ".join(str(error).split())
    match = _QUOTED_OP.search(text)
    op = next((g for g in match.groups() if g), None) if match else None
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    where = f" on op {op}" if op else ""
    if "neither a custom op nor a flex op" in text:  # no TFLite kernel at all: no mode helps
        return TechniqueError(f"{mode}: the TFLite converter failed{where}: TensorFlow Lite has no "
                              f"kernel for it in any mode; do that step outside the model (e.g. in "
                              f"your preprocessing) or replace the layer that makes it")
    return TechniqueError(f"{mode}: the TFLite converter failed{where} ({first}); try dynamic or "
                          f"float16, which keep float kernels, or int8-fallback, which lets such an "
                          f"op stay float")


def refuse_int16_abort(tflite: bytes) -> None:
    """Stop an int16x8 file LiteRT would abort on before anything invokes it (the worker would die)."""
    from .measure import int16_abort_reason

    if reason := int16_abort_reason(tflite):
        raise TechniqueError(f"int16x8: {reason}; use int8-fallback or int8-only, or lq-w8a16 (the "
                             f"LiteRT Quantizer's 16-bit activations)")


def io_details(mode: str, input_dtype: str | None) -> dict[str, Any]:
    """What integer-only I/O did to an input that is already integer (token ids stay as they are)."""
    if mode in ("int8-only", "uint8-only") and input_dtype and input_dtype.startswith(("int", "uint")):
        return {"io_note": f"the {input_dtype} input stays {input_dtype} (token ids are not "
                           f"quantized); integer-only I/O applies to float inputs and the output"}
    return {}


def conversion_details(context: BuildContext, mode: str, notes: list[str]) -> dict[str, Any]:
    details: dict[str, Any] = io_details(mode, context.manifest.get("input_dtype"))
    if notes:
        details["conversion_notes"] = notes
    return details


def _ptq(mode: str, weights_param: bool = False) -> Callable[[BuildContext, dict], Produced]:
    """A converter mode as a technique; only the int8 modes that declare the `weights` parameter
    record it (float16 has no per-channel or per-tensor integer scales to speak of)."""
    def produce(context: BuildContext, params: dict) -> Produced:
        weights = params.get("weights", "per-channel")
        tflite, notes = convert_model(context, None, mode, weights=weights)
        if mode == "int16x8":
            refuse_int16_abort(tflite)
        return Produced(tflite=tflite, details={"conversion": mode,
                                                **({"weights": weights} if weights_param else {}),
                                                **conversion_details(context, mode, notes)})
    return produce


WEIGHTS_PARAM = Param("weights", "per-channel",
                      "int8 kernel scales: one per output channel, or one per tensor (what some "
                      "older DSP/NPU delegates require; can cost accuracy)",
                      choices=WEIGHT_GRANULARITIES)


def _baseline(context: BuildContext, params: dict) -> Produced:
    """The float model itself, measured in its own framework by the worker (see float_models)."""
    return Produced(tflite=None)


def _as_uploaded(context: BuildContext, params: dict) -> Produced:
    from pathlib import Path

    return Produced(tflite=Path(context.manifest["model_path"]).read_bytes(),
                    details={"conversion": "none: the uploaded .tflite as it is"})


TECHNIQUES: list[Technique] = [
    Technique("baseline", "baseline", "Float baseline",
              "the float model itself, measured in its own framework (tf_keras, Keras 3, or a "
              "SavedModel's serving signature in TensorFlow): the reference", _baseline),
    Technique("as-uploaded", "uploaded", "Uploaded .tflite",
              "a ready TensorFlow Lite file, measured as it is (no float reference to agree with)",
              _as_uploaded, sources=("tflite",)),
    Technique("float32", "float", "TFLite float32",
              "plain conversion, no quantization: the TFLite reference", _ptq("float32")),
    Technique("dynamic", "ptq", "Dynamic range",
              "int8 weights, float activations quantized on the fly; no data needed (~4x smaller)",
              _ptq("dynamic")),
    Technique("float16", "ptq", "Float16",
              "float16 weights (~2x smaller); GPU delegates run them natively", _ptq("float16")),
    Technique("int8-fallback", "ptq", "Full integer, float fallback",
              "int8 weights and activations from calibration data; float input/output, float ops "
              "where no int8 kernel exists", _ptq("int8-fallback", weights_param=True), params=(WEIGHTS_PARAM,), needs_calibration=True),
    Technique("int8-only", "ptq", "Integer only (int8 I/O)",
              "every op int8, int8 input/output: for Edge TPU and microcontrollers",
              _ptq("int8-only", weights_param=True), params=(WEIGHTS_PARAM,), needs_calibration=True, integer_only=True),
    Technique("uint8-only", "ptq", "Integer only (uint8 I/O)",
              "every op int8, uint8 input/output: for older accelerators that expect uint8",
              _ptq("uint8-only", weights_param=True), params=(WEIGHTS_PARAM,), needs_calibration=True, integer_only=True),
    Technique("int16x8", "ptq", "16x8 (int16 activations)",
              "int16 activations, int8 weights: better accuracy than int8, reference kernels (slow)",
              _ptq("int16x8"), needs_calibration=True, integer_only=True),
]


# --- int8 with the most sensitive layers kept in float (quantlab.sensitivity) --------------------


def _int8_selective(context: BuildContext, params: dict) -> Produced:
    from .sensitivity import produce_selective

    tflite, details = produce_selective(context, params["keep_float"])
    return Produced(tflite=tflite, details=details)


TECHNIQUES.append(Technique(
    "int8-selective", "ptq", "Int8, sensitive layers in float",
    "int8 with float fallback, except the N layers with the largest quantization error (TFLite's "
    "QuantizationDebugger: RMSE / scale on the calibration data), which stay float",
    _int8_selective,
    params=(Param("keep_float", 2, "how many of the most sensitive layers stay float", minimum=0,
                  maximum=1000),),
    needs_calibration=True))


