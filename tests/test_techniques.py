"""The technique registry: parameters, defaults, parsing of --techniques; no TensorFlow needed."""

import pytest

from quantlab.config import TechniqueSpec
from quantlab.errors import TechniqueError
from quantlab.ptq import PTQ_MODES
from quantlab.techniques import all_techniques, get_technique, parse_technique_list

PTQ_IDS = {"baseline", "float32", "dynamic", "float16", "int8-fallback", "int8-only", "uint8-only",
           "int16x8"}


def test_every_post_training_mode_is_registered():
    ids = {t.id for t in all_techniques()}
    assert PTQ_IDS <= ids
    assert set(PTQ_MODES) <= ids


def test_all_for_a_keras_model_excludes_the_tflite_only_technique():
    ids = [spec.id for spec in parse_technique_list("all")]
    assert PTQ_IDS <= set(ids)
    assert "as-uploaded" not in ids
    # a .tflite is measured as it is, and the LiteRT Quantizer's schemes can start from a float one
    assert [spec.id for spec in parse_technique_list("all", "tflite")] == [
        "as-uploaded", "lq-int8-weight-only", "lq-int4-weight-only", "lq-int4-dynamic", "lq-w8a8",
        "lq-w8a16", "lq-w4a8"]


def test_a_list_keeps_order_and_drops_repeats():
    assert [s.id for s in parse_technique_list("float16, dynamic,float16")] == ["float16", "dynamic"]


def test_unknown_technique_names_the_way_to_list_them():
    with pytest.raises(TechniqueError, match="python -m quantlab techniques"):
        parse_technique_list("int4")


def test_specs_with_equal_work_hash_equally():
    a = TechniqueSpec("dynamic", {})
    b = TechniqueSpec.from_dict(a.to_dict())
    assert a == b and a.key == b.key
    assert TechniqueSpec("x", {"a": 1, "b": 2}).key == TechniqueSpec("x", {"b": 2, "a": 1}).key


def test_integer_only_techniques_need_calibration():
    for technique_id in ("int8-only", "uint8-only", "int16x8"):
        technique = get_technique(technique_id)
        assert technique.integer_only and technique.needs_calibration


def test_a_converter_failure_is_one_line_naming_the_op_and_what_to_try():
    from quantlab.ptq import converter_failure

    error = converter_failure("int16x8", RuntimeError(
        "Quantization to 16x8-bit not yet supported for op: 'UNIDIRECTIONAL_SEQUENCE_LSTM'.\nat ..."))
    text = str(error)
    assert "\n" not in text and text.startswith("int16x8:")
    assert "on op UNIDIRECTIONAL_SEQUENCE_LSTM" in text and "int8-fallback" in text
    assert "on op" not in str(converter_failure("dynamic", ValueError("something else")))
