"""Which techniques apply to a model, decided before any worker starts (quantlab.applicability)."""

from __future__ import annotations

from quantlab.applicability import describe_model_file, refusal, refusals
from quantlab.ui_state import technique_groups, upload_refusals
from tests import model_zoo as zoo

LSTM_MANIFEST = {"model_kind": "keras", "model_name": "lstm.h5", "has_labels": True,
                 "split_sizes": {"train": 100},
                 "layers": [{"layer": "lstm", "class": "LSTM", "cell": "LSTM"},
                            {"layer": "dense", "class": "Dense"}]}


def test_qat_family_is_refused_on_a_recurrent_layer_naming_it():
    for technique in ("qat-int8", "cqat-int8", "pqat-int8"):
        reason = refusal(technique, LSTM_MANIFEST)
        assert reason.startswith(technique) and "'lstm' (LSTM)" in reason and "int8-fallback" in reason


def test_pruning_clustering_and_every_ptq_stay_available_on_an_lstm():
    for technique in ("prune", "cluster", "prune-cluster", "dynamic", "int8-only", "int16x8", "baseline"):
        assert refusal(technique, LSTM_MANIFEST) is None


def test_the_quantizers_calibrated_recipes_are_refused_on_a_gru_and_kept_on_an_lstm():
    gru = {**LSTM_MANIFEST, "layers": [{"layer": "gru", "class": "GRU", "cell": "GRU"}]}
    for technique in ("lq-w8a8", "lq-w8a16", "lq-w4a8"):
        reason = refusal(technique, gru)
        assert reason.startswith(technique) and "'gru' (GRU)" in reason and "lq-int4-dynamic" in reason
        assert refusal(technique, LSTM_MANIFEST) is None              # the fused LSTM calibrates
    for technique in ("lq-int4-dynamic", "lq-int8-weight-only", "lq-int4-weight-only"):
        assert refusal(technique, gru) is None


def test_the_quantizers_calibrated_recipes_are_refused_on_an_lstm_fed_a_mask():
    """A mask keeps the LSTM from fusing: the quantizer failed on it after the work, as on a GRU."""
    masked = {**LSTM_MANIFEST, "layers": [{"layer": "lstm", "class": "LSTM", "cell": "LSTM", "masked": True}]}
    for technique in ("lq-w8a8", "lq-w8a16", "lq-w4a8"):
        assert refusal(technique, masked).startswith(f"{technique}: layer 'lstm' (LSTM, fed a mask) cannot be")
    assert refusal("lq-int8-weight-only", masked) is None


def test_every_calibrated_mode_is_refused_on_a_conv_lstm_naming_it():
    """Keras cannot unroll a ConvLSTM2D ("Unrolling is not possible with convolutional RNNs", a bare
    TypeError in the row) and calibrating its loop crashed the converter (segmentation fault)."""
    conv_lstm = {**LSTM_MANIFEST, "layers": [{"layer": "clstm", "class": "ConvLSTM2D", "cell": "ConvLSTM2D"}]}
    for technique in ("int8-fallback", "int8-only", "uint8-only", "int16x8", "int8-selective", "lq-w8a8"):
        reason = refusal(technique, conv_lstm)
        assert reason.startswith(f"{technique}: layer 'clstm' (ConvLSTM2D) cannot be calibrated"), reason
        assert "dynamic or float16" in reason
    for technique in ("float32", "dynamic", "float16", "lq-int8-weight-only", "prune"):
        assert refusal(technique, conv_lstm) is None
    qat = refusal("qat-int8", conv_lstm)   # it pointed to int8-fallback, refused a line above
    assert "use dynamic or float16, or prune / cluster" in qat and "int8-fallback" not in qat


def test_fine_tuning_needs_labels_and_a_train_split():
    unlabelled = {**LSTM_MANIFEST, "has_labels": False, "layers": []}
    assert "no labels" in refusal("prune", unlabelled)
    no_train = {**LSTM_MANIFEST, "split_sizes": {"train": 0}, "layers": []}
    assert "x_train" in refusal("cluster", no_train)
    assert refusal("int8-fallback", unlabelled) is None


def test_model_kinds_limit_techniques():
    saved_model = {"model_kind": "savedmodel", "model_name": "sm.zip"}
    assert "tf_keras model" in refusal("qat-int8", saved_model)
    assert refusal("baseline", saved_model) is None  # measured through its serving signature
    assert set(refusals({"model_kind": "tflite", "model_name": "m.tflite"}, ["as-uploaded", "dynamic"])) == {"dynamic"}


def test_an_uploaded_lstm_file_is_described_from_its_config_alone(tmp_path):
    path = zoo.save_h5(zoo.recurrent_model("lstm"), tmp_path, "lstm")
    described = describe_model_file(path)
    assert described["model_kind"] == "keras"
    assert {"layer": "lstm", "class": "LSTM"} in described["layers"]
    refused = upload_refusals(str(path), dataset_has_labels=True, dataset_has_train=True)
    assert set(refused) == {"qat-int8", "cqat-int8", "pqat-int8", "as-uploaded"}  # as-uploaded: .tflite only
    choices = {c.technique.id: c for g in technique_groups("keras", refused) for c in g.choices}
    assert not choices["qat-int8"].available and "'lstm' (LSTM)" in choices["qat-int8"].reason
    assert choices["prune"].available


def test_an_unreadable_file_describes_as_nothing_and_refuses_nothing(tmp_path):
    path = tmp_path / "broken.h5"
    path.write_bytes(b"not hdf5")
    assert describe_model_file(path) == {} and upload_refusals(str(path)) == {}


def test_output_names_of_an_uploaded_model_come_from_its_config(tmp_path):
    from quantlab.ui_state import make_sweep_spec, model_output_names

    path = zoo.save_h5(zoo.two_input_two_output_model(), tmp_path, "two")
    assert model_output_names(str(path)) == ["label_head", "aux_head"]
    assert model_output_names(str(zoo.save_h5(zoo.conv1d_model(), tmp_path, "one"))) == []  # Sequential: one
    spec = make_sweep_spec(str(path), "d.npz", (), label_output="aux_head")
    assert spec.label_output == "aux_head" and spec.to_dict()["label_output"] == "aux_head"
    assert "label_output" not in make_sweep_spec(str(path), "d.npz", ()).to_dict()


def test_a_zipped_savedmodel_is_told_apart_before_any_worker(tmp_path):
    """A plain SavedModel gets post-training techniques only; one tf_keras saved (keras_metadata.pb)
    can be rebuilt, so fine-tuning stays offered."""
    plain = zoo.save_saved_model_zip(zoo.conv1d_model(), tmp_path, "plain")
    assert describe_model_file(plain)["model_kind"] == "savedmodel"
    refused = upload_refusals(str(plain), dataset_has_labels=True, dataset_has_train=True)
    assert {"qat-int8", "prune", "cluster"} <= set(refused) and "dynamic" not in refused
    assert "tf_keras model" in refused["qat-int8"]
    keras_saved = tmp_path / "keras-saved"
    zoo.conv1d_model().save(keras_saved, save_format="tf")
    assert describe_model_file(keras_saved)["model_kind"] == "keras"
    import shutil
    zipped = shutil.make_archive(str(tmp_path / "keras-saved"), "zip", root_dir=keras_saved)
    assert describe_model_file(zipped)["model_kind"] == "keras"


def test_a_train_split_packed_per_input_counts_as_a_train_split(tmp_path):
    from quantlab.ui_state import dataset_facts

    path = zoo.save_multi_input_dataset(tmp_path, "two", n_train=20)
    assert dataset_facts(str(path)) == (True, True)


def test_int16x8_is_refused_on_a_layer_normalization_naming_it(tmp_path):
    """Measured: int16x8 of a LayerNormalization aborts LiteRT at its first invoke (the worker dies
    with SIGABRT and no message), so it is refused before any work."""
    described = describe_model_file(zoo.save_h5(zoo.transformer_model(), tmp_path, "encoder"))
    reason = refusal("int16x8", {**described, "has_labels": True, "split_sizes": {"train": 1}})
    assert reason.startswith("int16x8: layer 'layer_normalization") and "(LayerNormalization)" in reason
    assert refusal("int8-only", described) is None and refusal("lq-w8a16", described) is None


def test_the_input_shape_is_read_from_the_config_of_each_kind_of_keras_file(tmp_path):
    assert describe_model_file(zoo.save_h5(zoo.conv1d_model(), tmp_path, "seq"))["input_shape"] == [12, 4]
    assert describe_model_file(zoo.save_h5(zoo.recurrent_model("lstm"), tmp_path, "f"))["input_shape"] == [12, 4]
    k3 = zoo.save_keras(zoo.keras3_model(True), tmp_path, "k3")
    assert describe_model_file(k3)["input_shape"] == [16, 16, 1]
    two = zoo.save_h5(zoo.two_input_two_output_model(), tmp_path, "two")
    assert describe_model_file(two)["input_shape"] is None  # several inputs: the sweep checks them
