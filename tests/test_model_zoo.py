"""Users' models, end to end: every kind in the zoo gets a real sweep (real conversions, the real LiteRT
interpreter, real workers) and each technique either gives a full row or is refused with a reason
naming the layer. Models and data are built here (tests/model_zoo.py); nothing binary is committed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests import model_zoo as zoo
from quantlab.cache import ArtifactCache
from quantlab.config import MeasureSettings, SweepSpec, TechniqueSpec, TrainSettings
from quantlab.runner import SweepOptions, run_sweep
from quantlab.store import Store
from quantlab.techniques import resolve_spec

PTQ = ("float32", "dynamic", "float16", "int8-fallback", "int8-only", "uint8-only", "int16x8")
FAST = MeasureSettings(min_runs=5, min_seconds=0.02, warmup_runs=2)


def sweep(folder: Path, model: Path, dataset: Path, techniques: tuple[str, ...]) -> dict[str, dict]:
    """One real sweep in its own store and cache; {technique id: row}."""
    spec = SweepSpec(str(model), str(dataset),
                     tuple(resolve_spec(TechniqueSpec(t, {"epochs": 1} if t in FINE_TUNES else {}))
                           for t in techniques),
                     TrainSettings(epochs=1), FAST)
    report = run_sweep(spec, store=Store(folder / "q.duckdb"), cache=ArtifactCache(folder / "cache"),
                       options=SweepOptions(workers=1, source="test"))
    rows = {row["technique"]: row for row in report.rows}
    assert set(rows) == set(techniques)
    return rows


FINE_TUNES = ("qat-int8", "cluster", "prune", "cqat-int8", "pqat-int8", "prune-cluster")


def details(row: dict) -> dict:
    value = row.get("details") or {}
    return json.loads(value) if isinstance(value, str) else value


def assert_full(row: dict, labelled: bool = True) -> None:
    assert row["error"] is None, f"{row['technique']}: {row['error']}"
    assert row["model_bytes"] > 0 and row["gzip_bytes"] > 0
    assert row["latency_p50_ms"] > 0 and row["agreement"] is not None
    assert (row["accuracy"] is not None) == labelled


# --- recurrent layers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lstm_rows(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lstm")
    x, y = zoo.sequences(320)
    model = zoo.recurrent_model("lstm")
    zoo.train_briefly(model, x, y)
    data = zoo.save_dataset(folder, "seq", *zoo.sequences(120, seed=3), x_train=x, y_train=y)
    return sweep(folder, zoo.save_h5(model, folder, "lstm"), data,
                 ("baseline", *PTQ, "qat-int8", "prune", "cluster"))


def test_lstm_gets_every_post_training_row(lstm_rows):
    for technique in ("baseline", *PTQ):
        assert_full(lstm_rows[technique])


def test_lstm_float32_matches_keras_sample_after_sample(lstm_rows):
    # A fused LSTM keeps state between invokes: unless reset, the second sample on sees the first's.
    row = lstm_rows["float32"]
    assert row["agreement"] == 1.0 and row["sqnr_db"] > 60
    assert "batch 1" in " ".join(details(row)["conversion_notes"])


def test_lstm_int8_is_a_fused_integer_lstm(lstm_rows):
    ops = {op["op_name"]: op for op in details(lstm_rows["int8-only"])["inspection"]["ops"]}
    assert "UNIDIRECTIONAL_SEQUENCE_LSTM" in ops
    assert not ops["UNIDIRECTIONAL_SEQUENCE_LSTM"]["computes_in_float"]
    assert lstm_rows["int8-only"]["input_dtype"] == "int8"


def test_lstm_16x8_is_unrolled_because_the_fused_kernel_has_no_16x8(lstm_rows):
    notes = " ".join(details(lstm_rows["int16x8"])["conversion_notes"])
    assert "unrolled over 12 time steps" in notes and "16x8" in notes


def test_lstm_qat_is_refused_before_any_work_naming_the_layer(lstm_rows):
    row = lstm_rows["qat-int8"]
    assert "'lstm' (LSTM)" in row["error"] and "int8-fallback" in row["error"]
    assert row.get("conversion_seconds") is None and row.get("model_bytes") is None  # no worker ran it
    assert details(row) == {"error_kind": "refused", "before_work": True}


def test_lstm_prunes_and_clusters(lstm_rows):
    for technique in ("prune", "cluster"):
        assert_full(lstm_rows[technique])
    assert lstm_rows["prune"]["gzip_bytes"] < lstm_rows["float32"]["gzip_bytes"]


@pytest.fixture(scope="module")
def gru_rows(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gru")
    model = zoo.recurrent_model("gru")
    data = zoo.save_dataset(folder, "seq", *zoo.sequences(120, seed=3))
    return sweep(folder, zoo.save_h5(model, folder, "gru"), data, ("baseline", *PTQ))


def test_gru_gets_every_post_training_row(gru_rows):
    for technique in ("baseline", *PTQ):
        assert_full(gru_rows[technique])


def test_gru_is_unrolled_only_where_calibration_needs_it(gru_rows):
    # Calibrating the rolled GRU's WHILE loop crashed the converter with a segmentation fault.
    for technique in ("int8-fallback", "int8-only", "int16x8"):
        assert "unrolled" in " ".join(details(gru_rows[technique])["conversion_notes"])
    assert "unrolled" not in " ".join(details(gru_rows["dynamic"])["conversion_notes"])


# --- integer token inputs, one-hot labels ------------------------------------------------------------


@pytest.fixture(scope="module")
def token_rows(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokens")
    x, y = zoo.tokens(320)
    model = zoo.embedding_model()
    zoo.train_briefly(model, x, y)
    x_test, y_test = zoo.tokens(120, seed=3)
    data = zoo.save_dataset(folder, "tok", x_test, zoo.one_hot(y_test), x_train=x, y_train=y)
    return sweep(folder, zoo.save_h5(model, folder, "tokens"), data, ("baseline", *PTQ))


def test_token_model_gets_every_post_training_row(token_rows):
    for technique in ("baseline", *PTQ):
        assert_full(token_rows[technique])


def test_integer_only_io_keeps_the_int32_token_input_and_says_so(token_rows):
    row = token_rows["int8-only"]
    assert row["input_dtype"] == "int32" and row["output_dtype"] == "int8"
    assert "int32 input stays int32" in details(row)["io_note"]


def test_one_hot_labels_were_read_as_class_indices(token_rows):
    baseline = token_rows["baseline"]
    assert 0.0 < baseline["accuracy"] <= 1.0


# --- Keras 3, SavedModel, unlabelled data ---------------------------------------------------------------


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    x, y = zoo.images(200)
    x_test, y_test = zoo.images(100, seed=3)
    return {"labelled": zoo.save_dataset(folder, "img", x_test, y_test, x_train=x, y_train=y),
            "unlabelled": zoo.save_dataset(folder, "img-nolabels", x_test, x_calib=x[:64])}


@pytest.mark.parametrize("functional", [False, True], ids=["sequential", "functional"])
def test_keras3_model_baseline_runs_in_keras3_and_every_technique_gives_a_row(tmp_path, image_data, functional):
    model = zoo.keras3_model(functional)
    rows = sweep(tmp_path, zoo.save_keras(model, tmp_path, "k3"), image_data["labelled"],
                 ("baseline", *PTQ, "qat-int8", "prune"))
    for technique in ("baseline", *PTQ, "qat-int8", "prune"):  # fine-tuned on the tf_keras rebuild
        assert_full(rows[technique])
    assert details(rows["baseline"])["float_framework"] == "keras3"
    assert "Keras 3" in rows["baseline"]["latency_method"]
    assert rows["float32"]["agreement"] == 1.0


def test_saved_model_baseline_is_its_serving_signature(tmp_path, image_data):
    k = zoo.keras2()
    model = k.Sequential([k.Input((16, 16, 1)), k.layers.Conv2D(4, 3), k.layers.Flatten(),
                          k.layers.Dense(zoo.CLASSES)])
    rows = sweep(tmp_path, zoo.save_saved_model_zip(model, tmp_path, "sm"), image_data["labelled"],
                 ("baseline", "float32", "int8-only", "qat-int8"))
    for technique in ("baseline", "float32", "int8-only"):
        assert_full(rows[technique])
    assert details(rows["baseline"])["float_framework"] == "savedmodel"
    assert rows["float32"]["sqnr_db"] > 60  # the reference is the signature itself, in TensorFlow
    assert "tf_keras model" in rows["qat-int8"]["error"]


def test_unlabelled_dataset_is_compared_on_fidelity(tmp_path, image_data):
    model = zoo.mini_xception(size=16)
    rows = sweep(tmp_path, zoo.save_h5(model, tmp_path, "xception"), image_data["unlabelled"],
                 ("baseline", "float32", "dynamic", "int8-fallback", "prune"))
    for technique in ("baseline", "float32", "dynamic", "int8-fallback"):
        assert_full(rows[technique], labelled=False)
        assert details(rows[technique])["labels"] is False
    assert rows["baseline"]["agreement"] == 1.0
    assert "no labels" in rows["prune"]["error"]


def test_one_hot_and_unlabelled_arrays_stay_numbers(image_data):
    from quantlab.uploads import load_uploaded_dataset

    dataset = load_uploaded_dataset(image_data["unlabelled"])
    assert not dataset.has_labels and "no labels" in dataset.source
    assert np.all(dataset.y_test == -1)


# --- several inputs and outputs ----------------------------------------------------------------


@pytest.fixture(scope="module")
def multi_rows(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multi")
    model = zoo.save_h5(zoo.two_input_two_output_model(), folder, "two-in-two-out")
    data = zoo.save_multi_input_dataset(folder, "two-in", n_train=64)
    return sweep(folder, model, data, ("baseline", *PTQ, "int8-selective", "prune", "cluster", "qat-int8"))


def test_two_inputs_two_outputs_get_every_post_training_row(multi_rows):
    for technique in ("baseline", *PTQ):
        assert_full(multi_rows[technique])
    assert multi_rows["float32"]["agreement"] == 1.0 and multi_rows["float32"]["sqnr_db"] > 60


def test_every_output_is_compared_with_the_float_model_and_the_labels_go_to_the_first(multi_rows):
    outputs = {entry["output"]: entry for entry in details(multi_rows["float32"])["outputs"]}
    assert set(outputs) == {"label_head", "aux_head"}
    assert outputs["label_head"]["labels"] and not outputs["aux_head"]["labels"]
    assert outputs["aux_head"]["sqnr_db"] > 60 and outputs["label_head"]["agreement"] == 1.0


def test_integer_only_io_quantizes_the_float_input_and_keeps_the_token_input(multi_rows):
    inputs = {i["name"].split("_")[-1].split(":")[0]: i["dtype"]
              for i in details(multi_rows["int8-only"])["inspection"]["inputs"]}
    assert sorted(inputs.values()) == ["int32", "int8"]


def test_the_debugger_ranks_and_keeps_layers_float_on_two_inputs_and_two_outputs(multi_rows):
    row = multi_rows["int8-selective"]
    assert_full(row)
    assert len(details(row)["kept_float"]) == 2 and details(row)["sensitivity"]


def test_fine_tuning_trains_a_two_input_two_output_model_on_its_labelled_head(multi_rows):
    for technique in ("prune", "cluster", "qat-int8"):
        row = multi_rows[technique]
        assert_full(row)
        stats = details(row)["fine_tune"]
        assert stats["label_output"] == "label_head" and stats["train_samples"] == 64, technique
        outputs = {entry["output"]: entry for entry in details(row)["outputs"]}
        assert set(outputs) == {"label_head", "aux_head"}, technique   # both heads still measured
    assert details(multi_rows["prune"])["fine_tune"]["sparsity"]["overall"] >= 0.45


def test_label_output_picks_the_head_the_labels_belong_to(tmp_path):
    from quantlab.errors import QuantLabError

    model = zoo.save_h5(zoo.two_input_two_output_model(), tmp_path, "m")
    data = zoo.save_multi_input_dataset(tmp_path, "d")
    spec = SweepSpec(str(model), str(data), (resolve_spec(TechniqueSpec("float32")),),
                     TrainSettings(epochs=1), FAST, label_output="no_such_head")
    with pytest.raises(QuantLabError) as error:
        run_sweep(spec, store=Store(tmp_path / "q.duckdb"), cache=ArtifactCache(tmp_path / "cache"),
                  options=SweepOptions(workers=1, source="test"))
    assert "no_such_head" in str(error.value) and "label_head" in str(error.value)


def test_labels_that_do_not_fit_the_chosen_output_name_that_output(tmp_path):
    from quantlab.errors import QuantLabError

    model = zoo.save_h5(zoo.two_input_two_output_model(), tmp_path, "m")
    data = zoo.save_multi_input_dataset(tmp_path, "d")  # class ids 0..2: the 3-unit head's labels
    spec = SweepSpec(str(model), str(data), (resolve_spec(TechniqueSpec("float32")),),
                     TrainSettings(epochs=1), FAST, label_output="aux_head")  # 2 units
    with pytest.raises(QuantLabError) as error:
        run_sweep(spec, store=Store(tmp_path / "q.duckdb"), cache=ArtifactCache(tmp_path / "cache"),
                  options=SweepOptions(workers=1, source="test"))
    assert "output 'aux_head'" in str(error.value) and "choose it as the label output" in str(error.value)


def save_tflite(model, folder: Path, name: str) -> Path:
    from quantlab.tfcompat import import_tensorflow

    path = folder / f"{name}.tflite"
    path.write_bytes(import_tensorflow()[0].lite.TFLiteConverter.from_keras_model(model).convert())
    return path


@pytest.mark.parametrize("case, said", [
    ("two inputs and two outputs", "has 2 inputs and 2 outputs"),
    ("data for two inputs", "has arrays for several inputs but one.tflite has one input"),
    ("a label output to pick", "no label output to choose"),
])
def test_a_tflite_it_cannot_measure_is_refused_before_any_variant(tmp_path, case, said):
    """Several inputs and outputs are matched by name for Keras models only; a .tflite with them,
    or data or a label output meant for them, got as far as every variant failing on its own."""
    from quantlab.errors import QuantLabError

    if case == "two inputs and two outputs":
        model = save_tflite(zoo.two_input_two_output_model(), tmp_path, "two")
        data = zoo.save_multi_input_dataset(tmp_path, "d")
    else:
        model = save_tflite(zoo.conv1d_model(), tmp_path, "one")
        data = (zoo.save_multi_input_dataset(tmp_path, "d") if case == "data for two inputs"
                else zoo.save_dataset(tmp_path, "d", *zoo.sequences(40)))
    spec = SweepSpec(str(model), str(data), (resolve_spec(TechniqueSpec("as-uploaded")),),
                     TrainSettings(epochs=1), FAST, label_output="label_head" if "label" in case else None)
    store = Store(tmp_path / "q.duckdb")
    with pytest.raises(QuantLabError) as error:
        run_sweep(spec, store=store, cache=ArtifactCache(tmp_path / "cache"),
                  options=SweepOptions(workers=1, source="test"))
    assert said in str(error.value)
    assert store.count() == 0


# --- transfer learning, mixed precision, GroupNormalization, a masked LSTM -------------------------


def save_in(framework: str, build, folder: Path, name: str) -> Path:
    """A zoo model built and saved by tf_keras (.h5) or Keras 3 (.keras)."""
    if framework == "keras3":
        return zoo.save_keras(build(zoo.keras3()), folder, name)
    return zoo.save_h5(build(), folder, name)


def provenance(row: dict) -> dict:
    value = row.get("provenance") or {}
    return json.loads(value) if isinstance(value, str) else value


@pytest.mark.parametrize("framework", ["tf_keras", "keras3"])
def test_a_backbone_inside_a_classifier_is_fine_tuned_layer_by_layer(tmp_path, image_data, framework):
    """tfmot wraps top-level layers only: QAT, pruning and clustering were refused ("rebuild the model
    flat"). The backbone is now inlined, so its convolutions are quantized, pruned and clustered."""
    path = save_in(framework, zoo.transfer_model, tmp_path, "transfer")
    techniques = ("baseline", "int8-only", "qat-int8", "prune", "cluster")
    rows = sweep(tmp_path, path, image_data["labelled"], techniques)
    for technique in techniques:
        assert_full(rows[technique])
    for technique in ("qat-int8", "prune", "cluster"):
        fine_tune = details(rows[technique])["fine_tune"]
        assert fine_tune["inlined"][0].startswith("nested model 'backbone'")
        optimized = {entry["layer"] for entry in fine_tune["optimized_layers"]}
        assert {"backbone_head", "head"} <= optimized, optimized   # a backbone conv and the classifier's head
    # 200 train samples are also the calibration set: no accuracy on them passes for validation
    assert details(rows["qat-int8"])["fine_tune"]["validation_split"] is None
    assert "calibration set is the train split" in details(rows["qat-int8"])["fine_tune"]["validation_note"]
    sparsity = details(rows["prune"])["fine_tune"]["sparsity"]["layers"]
    assert sparsity["backbone_head"]["sparsity"] == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("framework", ["tf_keras", "keras3"])
def test_a_mixed_precision_model_is_converted_and_fine_tuned_as_float32(tmp_path, image_data, framework):
    """Every conversion failed on its 16-bit casts ("'tf.Conv2D' op is neither a custom op nor a flex
    op") and tfmot's wrappers raised a TypeError."""
    path = save_in(framework, zoo.mixed_precision_model, tmp_path, "mixed")
    techniques = ("baseline", "float32", "int8-only", "qat-int8")
    rows = sweep(tmp_path, path, image_data["labelled"], techniques)
    for technique in techniques:
        assert_full(rows[technique])
        assert any("mixed precision (mixed_float16" in note for note in provenance(rows[technique])["model_notes"])
    assert rows["float32"]["sqnr_db"] > 30   # float32 against the float16-computing original (Keras 3)


def test_group_normalization_converts_with_the_batch_fixed_at_one(tmp_path, image_data):
    """With a dynamic batch its BROADCAST_TO failed in LiteRT, in every mode and after QAT."""
    techniques = ("float32", "int8-only", "qat-int8")
    rows = sweep(tmp_path, zoo.save_h5(zoo.group_norm_model(), tmp_path, "gn"), image_data["labelled"],
                 techniques)
    for technique in techniques:
        assert_full(rows[technique])
        assert "group_normalization with a dynamic batch" in " ".join(details(rows[technique])["conversion_notes"])
    assert rows["float32"]["agreement"] == 1.0


def test_an_lstm_fed_a_mask_is_unrolled_to_calibrate(tmp_path):
    """The mask keeps the LSTM from fusing: its WHILE loop crashed int8 calibration (segfault)."""
    x, y = zoo.padded_tokens(200)
    data = zoo.save_dataset(tmp_path, "padded", *zoo.padded_tokens(80, seed=3), x_train=x, y_train=y)
    rows = sweep(tmp_path, zoo.save_h5(zoo.masked_lstm_model(), tmp_path, "masked"), data,
                 ("float32", "int8-only", "lq-w8a8"))
    assert_full(rows["float32"])
    assert_full(rows["int8-only"])
    assert rows["float32"]["agreement"] == 1.0
    assert "'lstm' (LSTM, fed a mask) cannot be calibrated" in rows["lq-w8a8"]["error"]
    assert details(rows["lq-w8a8"]) == {"error_kind": "refused", "before_work": True}
    assert "unrolled over 10 time steps for int8-only" in " ".join(details(rows["int8-only"])["conversion_notes"])


def test_a_transposed_conv1d_runs_in_16x8_with_the_batch_fixed_at_one(tmp_path):
    """With a dynamic batch, int16x8's first invoke aborted the worker (SIGABRT): no row, no reason."""
    k = zoo.keras2()
    model = k.Sequential([k.Input(zoo.SEQ_SHAPE), k.layers.Conv1DTranspose(8, 3, strides=2, padding="same"),
                          k.layers.GlobalAveragePooling1D(), k.layers.Dense(zoo.CLASSES)])
    data = zoo.save_dataset(tmp_path, "seq", *zoo.sequences(80, seed=3))
    rows = sweep(tmp_path, zoo.save_h5(model, tmp_path, "c1t"), data, ("float32", "int16x8"))
    for technique in ("float32", "int16x8"):
        assert_full(rows[technique])
    assert "conv1d_transpose with a dynamic batch" in " ".join(details(rows["int16x8"])["conversion_notes"])


def test_a_layer_tflite_has_no_kernel_for_says_no_mode_helps(tmp_path):
    """CategoryEncoding becomes tf.DenseBincount, which no TFLite mode has: the row told the user to
    try dynamic or float16, which fail the same way."""
    k = zoo.keras2()
    model = k.Sequential([k.Input((4,), dtype="int32"), k.layers.CategoryEncoding(10, output_mode="multi_hot"),
                          k.layers.Dense(zoo.CLASSES)])
    x = np.random.default_rng(0).integers(0, 10, (40, 4)).astype(np.int32)
    data = zoo.save_dataset(tmp_path, "ids", x, x[:, 0] % zoo.CLASSES)
    rows = sweep(tmp_path, zoo.save_h5(model, tmp_path, "bincount"), data, ("float32", "dynamic"))
    for technique in ("float32", "dynamic"):
        assert rows[technique]["error"] == (
            f"{technique}: the TFLite converter failed on op tf.DenseBincount: TensorFlow Lite has no kernel "
            "for it in any mode; do that step outside the model (e.g. in your preprocessing) or replace the "
            "layer that makes it")


def test_a_conv_lstm_converts_without_calibration_and_the_calibrated_modes_say_why_not(tmp_path):
    k = zoo.keras2()
    model = k.Sequential([k.Input((4, 8, 8, 1)), k.layers.ConvLSTM2D(4, 3), k.layers.Flatten(),
                          k.layers.Dense(zoo.CLASSES)])
    x = np.random.default_rng(0).random((40, 4, 8, 8, 1)).astype(np.float32)
    data = zoo.save_dataset(tmp_path, "clips", x, np.arange(40) % zoo.CLASSES)
    rows = sweep(tmp_path, zoo.save_h5(model, tmp_path, "clstm"), data, ("float32", "dynamic", "int8-only"))
    for technique in ("float32", "dynamic"):
        assert_full(rows[technique])
    assert "'conv_lstm2d' (ConvLSTM2D) cannot be calibrated" in rows["int8-only"]["error"]
    assert details(rows["int8-only"]) == {"error_kind": "refused", "before_work": True}
