"""The LiteRT Quantizer family: recipes, what they really quantize, and full rows from a sweep."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import TINY_ARGS, run_cli
from quantlab import litert_quant as lq
from quantlab.errors import TechniqueError
from quantlab.techniques import get_technique, parse_technique_list, variant_label


@pytest.fixture(scope="module")
def tf_keras():
    from quantlab.tfcompat import import_tensorflow

    return import_tensorflow()


def float_tflite(tf_keras, layers, input_shape) -> bytes:
    tf, keras = tf_keras
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Input(input_shape), *layers])
    return tf.lite.TFLiteConverter.from_keras_model(model).convert()


@pytest.fixture(scope="module")
def conv_dense(tf_keras):
    keras = tf_keras[1]
    return float_tflite(tf_keras, [keras.layers.Conv2D(4, 3, name="conv"), keras.layers.Flatten(),
                                   keras.layers.Dense(16, name="fc"), keras.layers.Dense(4, name="fc_1")],
                        (8, 8, 1))


def weight_tensor(data: bytes, layer: str):
    from litert_quantizer.utils import tfl_flatbuffer_utils as fu

    subgraph = fu.read_model(data).subgraphs[0]
    by_name = {fu.get_tensor_name(t): t for t in subgraph.tensors}
    name = next(n for n, t in by_name.items() if f"/{layer}/" in n and len(t.shape) >= 2
                and not n.endswith("_scales"))
    return name, by_name


def test_int4_weights_are_int4_tensors_in_the_file(conv_dense):
    data, _ = lq.quantize(conv_dense, lq.scheme_recipe("lq-int4-dynamic", {}))
    assert lq.tensor_type_counts(data).get("INT4", 0) == 3          # the conv and both dense kernels
    assert lq.tensor_type_counts(conv_dense).get("INT4", 0) == 0
    assert len(data) < 0.4 * len(conv_dense)


@pytest.mark.parametrize("granularity,blocks", [("block32", 2), ("block64", 1)])
def test_blockwise_scales_come_one_per_block_of_a_dense_kernel(tf_keras, granularity, blocks):
    dense = float_tflite(tf_keras, [tf_keras[1].layers.Dense(8, name="fc")], (64,))
    data, _ = lq.quantize(dense, lq.scheme_recipe("lq-int4-dynamic", {"granularity": granularity}))
    name, tensors = weight_tensor(data, "fc")
    assert list(tensors[name].shape) == [8, 64]
    assert list(tensors[f"{name}_scales"].shape) == [8, blocks]    # 64 inputs / block size


def test_blockwise_on_a_conv_only_model_is_reported_as_quantizing_nothing(tf_keras):
    keras = tf_keras[1]
    conv_only = float_tflite(tf_keras, [keras.layers.Conv2D(4, 3), keras.layers.Conv2D(2, 3)], (8, 8, 1))
    data, _ = lq.quantize(conv_only, lq.scheme_recipe("lq-int4-dynamic", {"granularity": "block32"}))
    coverage = lq.op_coverage(data)
    assert coverage["quantized_ops"] == 0 and coverage["total_ops"] == 2
    assert coverage["summary"] == "quantized 0 of 2 ops (CONV_2D float)"


def test_no_quantize_keeps_one_layer_float_and_the_rest_quantized(conv_dense):
    recipe, notes = lq.mixed_precision_recipe({"fc_1": 32, "conv": 4}, default_bits=8)
    bound, widened = lq.bind_layer_rules(recipe, conv_dense)
    assert len(widened) == 1 and "StatefulPartitionedCall" in widened[0]   # fc_1 is the output op
    data, _ = lq.quantize(conv_dense, bound)
    types = {layer: weight_tensor(data, layer)[1][weight_tensor(data, layer)[0]].type
             for layer in ("conv", "fc", "fc_1")}
    assert types == {"conv": 17, "fc": 9, "fc_1": 0}                 # INT4, INT8, FLOAT32
    assert notes == []


def test_a_lab_bit_width_the_quantizer_lacks_is_rounded_up_and_said():
    recipe, notes = lq.mixed_precision_recipe({"fc": 3, "conv": 6}, default_bits=8)
    bits = {r["regex"]: r["op_config"]["weight_tensor_config"]["num_bits"] for r in recipe}
    assert bits == {".*": 8, lq.layer_regex("conv"): 8, lq.layer_regex("fc"): 4}
    assert notes == ["conv: 6 bits rounded up to 8 (the quantizer takes 2, 4, 8 or 16)",
                     "fc: 3 bits rounded up to 4 (the quantizer takes 2, 4, 8 or 16)"]


def test_a_layer_regex_does_not_catch_a_layer_whose_name_starts_the_same():
    import re

    assert re.search(lq.layer_regex("dense"), "sequential/dense/MatMul")
    assert not re.search(lq.layer_regex("dense"), "sequential/dense_1/MatMul")


def test_a_recipe_round_trips_through_json_and_the_quantizer(conv_dense, tmp_path):
    from litert_quantizer import quantizer

    recipe, _ = lq.mixed_precision_recipe({"fc": 4, "fc_1": 32})
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe, indent=2))
    text = lq.read_recipe(str(path))
    assert json.loads(text) == recipe and lq.read_recipe(text) == text
    qt = quantizer.Quantizer(conv_dense)
    qt.load_quantization_recipe(json.loads(text))
    assert lq.canonical_recipe(qt.get_quantization_recipe()) == text


def test_bad_recipes_are_one_line_errors_that_say_what_a_recipe_is(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    cases = {str(tmp_path / "bad.json"): "is not JSON", str(tmp_path / "missing.json"): "cannot read",
             '{"regex": ".*"}': "one object", '[{"regex": ".*"}]': "has no 'operation'",
             '[{"regex": "(", "operation": "*", "algorithm_key": "OCTAV", "op_config": {}}]': "invalid regex",
             '[{"regex": ".*", "operation": "*", "algorithm_key": "magic", "op_config": {}}]': "magic"}
    for value, words in cases.items():
        with pytest.raises(TechniqueError, match=words) as caught:
            lq.read_recipe(value)
        assert "\n" not in str(caught.value)


def test_a_granularity_the_scheme_cannot_take_is_refused_when_the_list_is_read():
    with pytest.raises(TechniqueError, match="applies to dynamic recipes"):
        parse_technique_list("lq-w8a8:granularity=block32")
    with pytest.raises(TechniqueError, match="lq-recipe needs a recipe"):
        parse_technique_list("lq-recipe")
    (spec,) = parse_technique_list("lq-int4-dynamic:granularity=block64;algorithm=octav")
    assert spec.params == {"granularity": "block64", "algorithm": "octav"}


def test_every_lq_technique_but_the_recipe_is_part_of_all_and_a_recipe_label_stays_short(tmp_path):
    ids = {spec.id for spec in parse_technique_list("all")}
    assert set(lq.SCHEMES) <= ids and "lq-recipe" not in ids
    path = tmp_path / "r.json"
    path.write_text(json.dumps(lq.mixed_precision_recipe({"fc": 4})[0]))
    (spec,) = parse_technique_list(f"lq-recipe:recipe={path}")
    label = variant_label(spec.id, spec.params)
    assert label.startswith("lq-recipe(recipe=#") and len(label) < 40
    assert get_technique("lq-w8a16").family == "litert"


def test_validation_compares_every_activation_with_the_float_model(conv_dense):
    samples = [{"input_1": np.random.default_rng(i).random((1, 8, 8, 1), dtype=np.float32)}
               for i in range(3)]
    key, names = lq.signature_inputs(conv_dense)
    samples = [{names[0]: s["input_1"]} for s in samples]
    _, report = lq.quantize(conv_dense, lq.scheme_recipe("lq-int8-weight-only", {}), validation=samples,
                            signature=key)
    rows = report["validation"]
    assert {row["kind"] for row in rows} == {"intermediate", "output"}
    assert {"conv", "fc", "fc_1"} <= {row["layer"] for row in rows}
    assert all(row["snr_db"] is None or row["snr_db"] > 20 for row in rows)   # int8 weights: close
    assert all(0.99 < row["cosine"] <= 1.0 + 1e-6 for row in rows)


def test_a_sweep_gives_full_lq_rows_and_int4_is_smaller_than_every_8_bit_variant(tiny_sweep, tmp_path):
    # its own store (the shared sweep's rows stay as they are), the shared cache (the baseline is ready)
    result = run_cli("sweep", *TINY_ARGS, "--techniques", "lq-int4-dynamic,lq-w8a8,lq-int8-weight-only",
                     "--db", str(tmp_path / "q.duckdb"), "--cache", str(tiny_sweep["cache"]), "--json",
                     check=True)
    rows = {row["technique"]: row for row in map(json.loads, result.stdout.splitlines())}
    earlier = {row["technique"]: row for row in map(json.loads, tiny_sweep["stdout"].splitlines())}
    assert set(rows) == {"lq-int4-dynamic", "lq-w8a8", "lq-int8-weight-only"}
    for technique, row in rows.items():
        assert row["error"] is None, (technique, row["error"])
        assert row["accuracy"] > 0.5 and row["agreement"] > 0.9 and row["latency_p50_ms"] > 0
        details = row["details"]
        assert details["quantizer_version"] == "0.11.0" and details["recipe"]
        assert details["op_coverage"]["quantized_ops"] >= 2
        assert details["validation"] and "error" not in details["validation"][0]
    eight_bit = [rows["lq-w8a8"], rows["lq-int8-weight-only"], earlier["dynamic"], earlier["int8-fallback"],
                 earlier["int8-only"]]
    assert rows["lq-int4-dynamic"]["model_bytes"] < min(row["model_bytes"] for row in eight_bit)
    assert rows["lq-int4-dynamic"]["details"]["tensor_types"].get("INT4", 0) >= 2
    assert rows["lq-w8a8"]["details"]["calibrated"] is True


def test_keeping_the_most_sensitive_tensors_float_makes_no_quantize_rules_after_the_scheme(conv_dense):
    recipe = lq.keep_float_recipe(["sequential/fc/MatMul1", "StatefulPartitionedCall:0"])
    assert [r["algorithm_key"] for r in recipe] == ["min_max_uniform_quantize", "no_quantize", "no_quantize"]
    assert recipe[1]["regex"] == lq.layer_regex("fc") and recipe[2]["regex"] == "(?:^|;)StatefulPartitionedCall:0;"
    data, _ = lq.quantize(conv_dense, recipe, calibration=[
        {lq.signature_inputs(conv_dense)[1][0]: np.random.default_rng(i).random((1, 8, 8, 1), dtype=np.float32)}
        for i in range(4)])
    coverage = lq.op_coverage(data)["by_type"]
    assert coverage["FULLY_CONNECTED"] == {"quantized": 0, "total": 2}
    assert coverage["CONV_2D"] == {"quantized": 1, "total": 1}


def test_the_dashboard_takes_a_pasted_recipe_but_never_reads_a_server_path(tmp_path):
    from quantlab.ui_state import build_technique_specs

    recipe = json.dumps(lq.mixed_precision_recipe({"fc": 4})[0])
    specs, errors = build_technique_specs({"lq-recipe": {"recipe": recipe}})
    assert errors == {} and specs[0].params["recipe"] == lq.canonical_recipe(json.loads(recipe))
    path = tmp_path / "secret.json"
    path.write_text(recipe)
    specs, errors = build_technique_specs({"lq-recipe": {"recipe": str(path)}})
    assert specs == () and "read only by the command line" in errors["lq-recipe"]


def test_the_details_report_shows_coverage_validation_and_the_recipe_of_an_lq_row():
    from quantlab.ui_state import extra_details, quantizer_report

    row = {"details": {"recipe": [{"regex": ".*"}], "quantizer_version": "0.11.0", "ranges": "moving-average",
                       "op_coverage": {"summary": "quantized 1 of 2 ops (CONV_2D 1/1; RESHAPE float)",
                                       "by_type": {"CONV_2D": {"quantized": 1, "total": 1},
                                                   "RESHAPE": {"quantized": 0, "total": 1}}},
                       "tensor_types": {"INT8": 2, "FLOAT32": 3}, "calibrated": True,
                       "validation": [{"tensor": "a/conv/Relu", "layer": "conv", "kind": "intermediate",
                                       "mse": 0.1, "snr_db": 30.0, "cosine": 0.99}],
                       "fine_tune": {"epochs": 1}}}
    report = quantizer_report(row)
    assert report.coverage.to_dict("records") == [{"op": "CONV_2D", "quantized": 1, "total": 1},
                                                  {"op": "RESHAPE", "quantized": 0, "total": 1}]
    assert report.tensor_types == "FLOAT32 3, INT8 2" and json.loads(report.recipe_json) == [{"regex": ".*"}]
    assert any("moving average" in note for note in report.notes)
    assert extra_details(row) == {"fine_tune": {"epochs": 1}}          # the rest has its own section
    assert quantizer_report({"details": {"conversion": "dynamic"}}) is None
    from quantlab.charts import quantizer_validation_figure

    figure = quantizer_validation_figure(report.validation)
    assert list(figure.data[0].x) == ["1. conv"] and list(figure.data[0].y) == [30.0]


def test_an_uploaded_float_tflite_is_quantized_and_a_quantized_one_is_refused_in_one_line(tf_keras, tmp_path):
    from tests import model_zoo as zoo

    tf, keras = tf_keras
    model = keras.Sequential([keras.layers.Input((16, 16, 1)), keras.layers.Conv2D(4, 3),
                              keras.layers.Flatten(), keras.layers.Dense(zoo.CLASSES)])
    (tmp_path / "float.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    (tmp_path / "dynamic.tflite").write_bytes(converter.convert())
    data = zoo.save_dataset(tmp_path, "img", *zoo.images(40), x_calib=zoo.images(20, seed=2)[0])
    rows = {}
    for name in ("float", "dynamic"):
        result = run_cli("sweep", "--model", str(tmp_path / f"{name}.tflite"), "--dataset", str(data),
                         "--techniques", "as-uploaded,lq-int4-dynamic", "--min-runs", "5", "--min-seconds",
                         "0.05", "--db", str(tmp_path / "q.duckdb"), "--cache", str(tmp_path / "cache"),
                         "--json", check=True)
        rows[name] = {row["technique"]: row for row in map(json.loads, result.stdout.splitlines())}
    int4 = rows["float"]["lq-int4-dynamic"]
    assert int4["error"] is None and int4["details"]["tensor_types"].get("INT4") == 2
    assert int4["model_bytes"] < 0.35 * rows["float"]["as-uploaded"]["model_bytes"]   # measured 0.26x
    refused = rows["dynamic"]["lq-int4-dynamic"]["error"]
    assert "already quantized" in refused and "upload the float model" in refused and "\n" not in refused
