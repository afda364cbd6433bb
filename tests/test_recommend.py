"""The decision tree: every branch, the fallback chains, and backing with (synthetic) measurements."""

import numpy as np
import pandas as pd
import pytest

from quantlab import recommend
from quantlab.recommend import Answers, back_with_measurements, tree_frames

LEAVES = {node.id for node in recommend.NODES if node.field is None}


def advise(**answers):
    return recommend.recommend(Answers(**answers))


# --- every leaf is reachable, with the path that leads there ------------------------------------


@pytest.mark.parametrize("answers, leaf, technique", [
    (dict(hardware="gpu"), "gpu_float16", "float16"),
    (dict(hardware="gpu", accuracy_drop_ok=False), "gpu_float32", "float32"),
    (dict(hardware="cpu"), "cpu_int8", "int8-fallback"),
    (dict(hardware="cpu", representative_data=False), "cpu_dynamic", "dynamic"),
    (dict(hardware="cpu", accuracy_drop_ok=False), "cpu_float16", "float16"),
    (dict(hardware="cpu", integer_io=True), "int_int8", "int8-only"),
    (dict(hardware="edgetpu"), "int_int8", "int8-only"),
    (dict(hardware="edgetpu", uint8_io=True), "int_uint8_only", "uint8-only"),
    (dict(hardware="mcu", representative_data=False, can_retrain=True), "int_qat", "qat-int8"),
    (dict(hardware="mcu", representative_data=False), "int_blocked", None),
])
def test_each_answer_set_reaches_its_leaf(answers, leaf, technique):
    advice = advise(**answers)
    assert advice.leaf == leaf
    assert advice.technique == technique
    assert advice.reason


def test_every_leaf_of_the_tree_is_covered_above():
    covered = {"gpu_float16", "gpu_float32", "cpu_int8", "cpu_dynamic", "cpu_float16", "int_int8",
               "int_uint8_only", "int_qat", "int_blocked"}
    assert covered == LEAVES


def test_the_path_lists_each_question_with_its_answer():
    advice = advise(hardware="cpu", integer_io=True, uint8_io=True)
    assert [(s.node_id, s.answer) for s in advice.path] == [
        ("hardware", "CPU (phone, desktop)"), ("cpu_io", "yes"), ("int_data", "yes"), ("int_uint8", "yes")]
    assert advice.path_node_ids[-1] == "int_uint8_only"


def test_integer_hardware_ignores_the_cpu_only_question():
    assert advise(hardware="mcu", integer_io=False).technique == "int8-only"


def test_questions_off_the_path_do_not_change_the_answer():
    assert advise(hardware="gpu", representative_data=False, can_retrain=True).technique == "float16"


# --- fallback chains ------------------------------------------------------------------------------


def test_int8_only_falls_back_to_qat_when_retraining_is_possible_then_16x8():
    assert advise(hardware="mcu", can_retrain=True).chain == ("int8-only", "qat-int8", "int16x8")
    assert advise(hardware="mcu").chain == ("int8-only", "int16x8")


def test_the_edge_tpu_never_falls_back_to_16x8():
    assert advise(hardware="edgetpu", can_retrain=True).chain == ("int8-only", "qat-int8")
    assert advise(hardware="edgetpu").chain == ("int8-only",)


def test_cpu_chains():
    assert advise().chain == ("int8-fallback", "dynamic", "float16")
    assert advise(can_retrain=True).chain == ("int8-fallback", "qat-int8", "dynamic", "float16")
    assert advise(representative_data=False).chain == ("dynamic", "float16", "float32")
    assert advise(accuracy_drop_ok=False).chain == ("float16", "float32")


def test_qat_on_a_microcontroller_with_data_falls_back_to_16x8():
    chain = recommend.fallback_chain("qat-int8", Answers(hardware="mcu", can_retrain=True))
    assert [f.technique for f in chain] == ["int16x8"]


def test_nothing_to_fall_back_from():
    assert advise(hardware="mcu", representative_data=False).chain == ()
    assert advise(hardware="gpu", accuracy_drop_ok=False).chain == ("float32",)


# --- answers --------------------------------------------------------------------------------------


def test_tolerance_is_zero_when_no_drop_is_acceptable():
    assert Answers(max_drop_points=2.5).tolerance_points == 2.5
    assert Answers(accuracy_drop_ok=False, max_drop_points=2.5).tolerance_points == 0.0


def test_bad_answers_are_refused_with_the_accepted_values():
    with pytest.raises(ValueError, match="cpu, gpu, edgetpu, mcu"):
        Answers(hardware="tpu")
    with pytest.raises(ValueError, match="0 or more"):
        Answers(max_drop_points=-1)


def test_answers_round_trip_and_ignore_unknown_keys():
    answers = Answers(hardware="mcu", can_retrain=True)
    assert Answers.from_dict({**answers.to_dict(), "colour": "red"}) == answers
    assert advise(hardware="mcu").to_dict()["technique"] == "int8-only"


def test_labels_cover_techniques_not_registered_yet():
    assert recommend.technique_label("dynamic") == "Dynamic range"
    assert recommend.technique_label("qat-int8") in ("Quantization-aware training (int8)",
                                                     recommend.technique_label("qat-int8"))
    assert recommend.technique_label("made-up") == "made-up"
    assert recommend.technique_label(None) == "no technique yet"


# --- the tree as frames ----------------------------------------------------------------------------


def test_tree_frames_flag_the_answered_path():
    advice = advise(hardware="edgetpu")
    nodes, edges = tree_frames(advice)
    assert set(nodes.loc[nodes.on_path, "id"]) == {"hardware", "int_data", "int_uint8", "int_int8"}
    assert nodes.loc[nodes.chosen, "id"].tolist() == ["int_int8"]
    taken = edges.loc[edges.on_path, ["source", "target"]].apply(tuple, axis=1).tolist()
    assert taken == [("hardware", "int_data"), ("int_data", "int_uint8"), ("int_uint8", "int_int8")]


def test_tree_layout_puts_children_below_parents_and_nodes_apart():
    nodes, edges = tree_frames()
    assert not nodes["on_path"].any()
    assert (edges["y1"] < edges["y0"]).all()
    assert not nodes.duplicated(["x", "y"]).any()


# --- backing with measurements ---------------------------------------------------------------------


def measured(**changes):
    """A synthetic compare frame: technique -> accuracy change (points)."""
    rows = []
    for technique, change in changes.items():
        technique = technique.replace("_", "-")
        rows.append({"row_id": f"row-{technique}", "technique": technique, "error": None,
                     "x_smaller": 4.0, "speedup": 2.0, "accuracy_change_points": change,
                     "reference_technique": "baseline", "reference_note": "Keras baseline"})
    return pd.DataFrame(rows)


def test_measured_within_tolerance_quotes_this_models_numbers():
    backing = back_with_measurements(advise(hardware="edgetpu"), measured(int8_only=-0.4))
    assert backing.status == "fits" and backing.technique == "int8-only" and backing.row_id == "row-int8-only"
    assert backing.text == ("On this model, against the Keras baseline: Integer only (int8 I/O) is "
                            "4.0x smaller, -0.4 points, 2.0x faster.")


def test_exceeding_points_to_the_next_option_that_fits():
    backing = back_with_measurements(advise(hardware="mcu", can_retrain=True),
                                     measured(int8_only=-2.3, qat_int8=-0.5))
    assert backing.status == "fits" and backing.technique == "qat-int8"
    assert "loses 2.3 points" in backing.text and "more than your 1-point tolerance" in backing.text
    assert "the next option" in backing.text and "fits: 4.0x smaller, -0.5 points" in backing.text


def test_exceeding_with_the_next_option_unmeasured_says_what_to_run():
    backing = back_with_measurements(advise(hardware="mcu", can_retrain=True), measured(int8_only=-2.3))
    assert backing.status == "exceeds" and backing.to_run == ("qat-int8",)
    assert "(qat-int8), is not measured yet: run it" in backing.text


def test_every_option_exceeding_says_so():
    backing = back_with_measurements(advise(hardware="edgetpu"), measured(int8_only=-2.3))
    assert backing.status == "exceeds" and backing.to_run == ()
    assert "no further option" in backing.text


def test_not_measured_names_the_techniques_to_run_and_the_baseline_if_missing():
    backing = back_with_measurements(advise(), None)
    assert backing.status == "not-measured"
    assert backing.to_run == ("baseline", "int8-fallback", "dynamic", "float16")
    assert backing.text.startswith("Not measured yet on this model: run int8-fallback")
    with_reference = back_with_measurements(advise(), measured(float16=0.0))
    assert with_reference.to_run == ("int8-fallback", "dynamic")


def test_a_zero_tolerance_accepts_no_measured_loss():
    advice = advise(accuracy_drop_ok=False)
    assert back_with_measurements(advice, measured(float16=0.0)).status == "fits"
    backing = back_with_measurements(advice, measured(float16=-0.1, float32=0.0))
    assert backing.technique == "float32"


def test_no_reference_asks_for_the_baseline():
    frame = measured(int8_only=np.nan).assign(reference_technique=None)
    backing = back_with_measurements(advise(hardware="edgetpu"), frame)
    assert backing.status == "no-reference" and backing.to_run == ("baseline",)


def test_failed_rows_do_not_count_as_measured():
    frame = measured(int8_only=-0.1).assign(error="conversion failed")
    assert back_with_measurements(advise(hardware="edgetpu"), frame).status == "not-measured"


def test_blocked_recommendation_has_nothing_to_measure():
    backing = back_with_measurements(advise(hardware="mcu", representative_data=False), measured())
    assert backing.status == "blocked" and "collect about 100-500" in backing.text


def test_the_best_of_several_params_counts_and_is_named_with_its_parameters():
    frame = pd.concat([measured(int8_only=-3.0).assign(params='{"weights": "per-channel"}'),
                       measured(int8_only=-0.2).assign(row_id="best", params='{"weights": "per-tensor"}')])
    backing = back_with_measurements(advise(hardware="edgetpu"), frame)
    assert backing.row_id == "best"
    assert "Integer only (int8 I/O) [int8-only(weights=per-tensor)] is 4.0x smaller" in backing.text


# --- running what is missing -----------------------------------------------------------------------


def test_runnable_splits_registered_from_unknown_ids():
    known, unknown = recommend.runnable_techniques(["dynamic", "made-up", "dynamic"])
    assert known == ["dynamic"] and unknown == ["made-up"]


def test_follow_up_spec_keeps_the_previous_sweeps_files_and_settings():
    previous = {"model": "/uploads/abc/model.keras", "dataset": "digits-28", "label_output": "label_head",
                "train": {"epochs": 3}, "measure": {"num_threads": 2, "min_runs": 20}}
    spec = recommend.follow_up_spec(previous, "model.keras", "digits-28", ["int8-only"])
    assert spec.model == "/uploads/abc/model.keras" and spec.train.epochs == 3
    assert spec.label_output == "label_head"  # the labels stay on the head they belong to
    assert spec.measure.num_threads == 2 and spec.measure.min_runs == 20
    assert [t.id for t in spec.techniques] == ["int8-only"]
    fresh = recommend.follow_up_spec(None, "seed-cnn", "digits", ["dynamic"])
    assert fresh.model == "seed-cnn" and fresh.dataset == "digits"


# --- the measured recommendation -------------------------------------------------------------------


def variants(*rows):
    """A compare frame from (technique, x smaller, accuracy change in points, x faster than float32[,
    input dtype, float ops]) rows, against a Keras baseline of 100,000 bytes."""
    frame = []
    for technique, smaller, change, faster, *io in rows:
        dtype, float_ops = (io + [None, None])[:2]
        frame.append({"row_id": f"row-{technique}", "technique": technique, "error": None,
                      "label": recommend.technique_label(technique), "model_bytes": int(100_000 / smaller),
                      "x_smaller": smaller, "accuracy": 0.95 + change / 100, "accuracy_change_points": change,
                      "latency_p50_ms": 0.01 / faster, "speedup": 50.0 * faster, "speedup_vs_float32": faster,
                      "reference_technique": "baseline", "reference_note": "Keras baseline",
                      "input_dtype": dtype, "float_ops": float_ops})
    return pd.DataFrame(frame)


CPU_MODEL = variants(("float32", 1.03, 0.0, 1.0), ("float16", 2.2, 0.0, 1.0), ("dynamic", 4.1, 0.0, 1.1),
                     ("int8-fallback", 4.0, -3.1, 1 / 1.1), ("int8-only", 4.1, -3.1, 0.9, "int8", 0))


def test_on_a_cpu_with_no_drop_allowed_the_measured_lossless_dynamic_range_wins():
    advice = advise(accuracy_drop_ok=False)
    assert advice.technique == "float16"  # the tree
    pick = recommend.measured_pick(advice, CPU_MODEL)
    assert pick.technique == "dynamic" and pick.row_id == "row-dynamic"
    assert pick.gain.startswith("4.1x smaller, ±0.0 points, 1.1x faster than TFLite float32")
    assert "losing at most 0 points" in pick.reason


def test_an_int8_that_loses_more_than_the_tolerance_is_not_the_headline():
    pick = recommend.measured_pick(advise(), CPU_MODEL)
    assert pick.technique == "dynamic"
    assert recommend.measured_gain("int8-fallback", CPU_MODEL).endswith("1.1x slower than TFLite float32 "
                                                                         "(45.5x faster than the Keras model "
                                                                         "in TensorFlow)")


def test_the_generic_figures_are_the_trees_claims_only():
    assert "3x+ faster" in advise().claim and "3x+" not in advise().reason
    assert all("x smaller" not in f.why and "x faster" not in f.why
               for answers in (dict(), dict(representative_data=False))
               for f in advise(**answers).fallbacks)


@pytest.mark.parametrize("answers, allowed", [
    (dict(), {"float32", "float16", "dynamic", "int8-fallback"}),
    (dict(representative_data=False), {"float32", "float16", "dynamic"}),
    (dict(hardware="gpu"), {"float32", "float16"}),
    (dict(hardware="edgetpu"), {"int8-only"}),
    (dict(hardware="edgetpu", uint8_io=True), set()),
    (dict(hardware="cpu", integer_io=True), {"int8-only"}),
])
def test_only_variants_the_deployment_can_run_are_candidates(answers, allowed):
    rows = CPU_MODEL.to_dict("records")
    assert {r["technique"] for r in rows if recommend.why_not_deployable(r, Answers(**answers)) is None} == allowed


def test_integer_hardware_refuses_a_variant_with_float_ops_and_the_edge_tpu_16_bits():
    rows = variants(("int8-only", 4.0, 0.0, 1.0, "int8", 2), ("int16x8", 4.0, 0.0, 0.1, "int16", 0))
    reasons = [recommend.why_not_deployable(r, Answers(hardware="edgetpu")) for r in rows.to_dict("records")]
    assert reasons == ["2 of its ops stayed float", "the Edge TPU has no 16-bit kernels"]
    assert recommend.why_not_deployable(rows.iloc[1].to_dict(), Answers(hardware="mcu")) is None


def test_no_measured_pick_when_nothing_fits_or_nothing_is_measured():
    assert recommend.measured_pick(advise(hardware="edgetpu"), CPU_MODEL) is None   # int8-only loses 3.1
    assert recommend.measured_pick(advise(), None) is None
    assert recommend.measured_pick(advise(), CPU_MODEL.assign(reference_technique=None)) is None


def test_without_labels_the_pick_is_judged_by_agreement():
    frame = CPU_MODEL.assign(accuracy=None, accuracy_change_points=None,
                             agreement=[1.0, 0.99, 0.97, 1.0, 1.0],
                             agreement_change_points=[0.0, -1.0, -3.0, 0.0, 0.0])
    pick = recommend.measured_pick(advise(), frame)
    assert pick.metric == "agreement" and pick.technique == "int8-fallback"
    assert "points of agreement" in pick.gain


# --- int4 weights (LiteRT Quantizer) when size is what counts -------------------------------------


def test_an_int4_variant_that_fits_the_tolerance_is_the_measured_pick_and_said_to_fit():
    frame = pd.concat([CPU_MODEL, variants(("lq-int4-dynamic", 7.5, -0.4, 0.6))], ignore_index=True)
    pick = recommend.measured_pick(advise(), frame)
    assert pick.technique == "lq-int4-dynamic"                       # the smallest within 1 point
    offer = recommend.int4_offer(advise(), frame)
    assert offer.status == "fits" and offer.row_id == "row-lq-int4-dynamic" and offer.to_run == ()


def test_an_int4_variant_that_loses_too_much_is_not_picked_and_its_loss_is_said():
    frame = pd.concat([CPU_MODEL, variants(("lq-int4-dynamic", 7.5, -2.5, 0.6))], ignore_index=True)
    assert recommend.measured_pick(advise(), frame).technique == "dynamic"
    offer = recommend.int4_offer(advise(), frame)
    assert offer.status == "exceeds" and "loses 2.5 points" in offer.text and "1-point" in offer.text


def test_int4_is_offered_for_measuring_on_a_cpu_only_and_only_when_a_drop_is_acceptable():
    offer = recommend.int4_offer(advise(), CPU_MODEL)
    assert offer.status == "not-measured" and offer.to_run == ("lq-int4-dynamic",)
    for answers in (dict(hardware="gpu"), dict(hardware="edgetpu"), dict(integer_io=True),
                    dict(accuracy_drop_ok=False)):
        assert recommend.int4_offer(advise(**answers), CPU_MODEL) is None, answers


def test_a_loss_beyond_the_tolerance_but_within_noise_says_both_without_contradiction():
    from quantlab.recommend import _exceeded_words

    text = _exceeded_words([("int8-only", -2.5, "within noise on 120 samples")], 1.0)
    assert "loses 2.5 points (measured; within noise on 120 samples, so not proven)" in text
    assert text.endswith("more than your 1-point tolerance")
    assert "(95% CI -4.0 to -1.0 points, p = 0.01 on 450 samples)" in _exceeded_words(
        [("int8-only", -2.5, "95% CI -4.0 to -1.0 points, p = 0.01 on 450 samples")], 1.0)
