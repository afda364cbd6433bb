"""Training-aware techniques through the same registry, CLI, cache and store as post-training ones."""

import json

import pytest

from conftest import TINY_ARGS, run_cli
from quantlab.techniques import get_technique, parse_technique_list

TRAINING = "qat-int8,cluster:number_of_clusters=8,prune:target_sparsity=0.6"


@pytest.fixture(scope="module")
def training_rows(tiny_sweep):
    result = run_cli("sweep", *TINY_ARGS, "--techniques", TRAINING, "--db", str(tiny_sweep["db"]),
                     "--cache", str(tiny_sweep["cache"]), "--json", check=True)
    rows = {json.loads(line)["technique"]: json.loads(line) for line in result.stdout.splitlines()}
    float32 = next(json.loads(line) for line in tiny_sweep["stdout"].splitlines()
                   if json.loads(line)["technique"] == "float32")
    return rows, float32


def test_training_techniques_get_full_rows_with_fine_tune_stats(training_rows):
    rows, _ = training_rows
    assert set(rows) == {"qat-int8", "cluster", "prune"}
    for technique, row in rows.items():
        assert row["error"] is None, (technique, row["error"])
        stats = row["details"]["fine_tune"]
        assert stats["train_samples"] > 0 and stats["steps"] > 0
        assert stats["accuracy_before"] is not None and stats["accuracy_after"] is not None
        assert stats["validation_split"] == "calibration"
        assert row["accuracy"] > 0.5


def test_clustered_and_pruned_variants_gzip_smaller_than_float32(training_rows):
    rows, float32 = training_rows
    assert rows["cluster"]["gzip_bytes"] < float32["gzip_bytes"]
    assert rows["prune"]["gzip_bytes"] < float32["gzip_bytes"]


def test_pruning_reaches_its_target_and_clustering_its_k(training_rows):
    rows, _ = training_rows
    assert rows["prune"]["details"]["fine_tune"]["sparsity"]["overall"] >= 0.59
    stats = rows["cluster"]["details"]["fine_tune"]
    assert stats["clustered_layers"]
    assert max(stats["unique_values"][layer] for layer in stats["clustered_layers"]) <= 8


def test_qat_variant_is_int8_inside(training_rows):
    rows, _ = training_rows
    ops = rows["qat-int8"]["details"]["inspection"]["ops"]
    conv = [op for op in ops if op["op_name"] == "CONV_2D"]
    assert conv and all("int8" in op["input_dtypes"] for op in conv)


def test_a_rerun_reuses_the_fine_tuned_models(tiny_sweep, training_rows):
    result = run_cli("sweep", *TINY_ARGS, "--techniques", "cluster:number_of_clusters=8;then=dynamic",
                     "--db", str(tiny_sweep["db"]), "--cache", str(tiny_sweep["cache"]), "--json", check=True)
    row = json.loads(result.stdout)
    assert row["error"] is None and not row["cached"]
    assert row["details"]["fine_tune"]["fine_tune_cached"] is True


def test_a_cached_qat_fine_tune_serves_a_variant_with_integer_io(tiny_sweep, training_rows):
    """The io=float variant's fine-tuned model, loaded back from the cache, converted with int8 I/O.
    Both failed before: the quantization-aware model did not load back from its .keras file, and
    integer I/O had no representative data for the input's range."""
    rows, _ = training_rows
    result = run_cli("sweep", *TINY_ARGS, "--techniques", "qat-int8:io=int8", "--db", str(tiny_sweep["db"]),
                     "--cache", str(tiny_sweep["cache"]), "--json", check=True)
    row = json.loads(result.stdout)
    assert row["error"] is None, row["error"]
    assert row["details"]["fine_tune"]["fine_tune_cached"] is True
    assert (row["input_dtype"], row["output_dtype"]) == ("int8", "int8")
    assert abs(row["accuracy"] - rows["qat-int8"]["accuracy"]) < 0.05  # the same fine-tuned model


def test_conversion_parameters_are_checked_before_any_work():
    with pytest.raises(Exception, match="then"):
        parse_technique_list("prune:then=int4")
    assert get_technique("qat-int8").fine_tunes and get_technique("qat-int8").sources == ("keras",)
