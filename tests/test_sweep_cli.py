"""The engine end to end through its CLI contract: real conversions, measurements, cache and store."""

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from conftest import ROOT, TINY_ARGS, TINY_TECHNIQUES, run_cli
from quantlab.cache import ArtifactCache
from quantlab.config import MeasureSettings, SweepSpec, TrainSettings
from quantlab.pool import PoolLimits
from quantlab.runner import SweepOptions, run_sweep
from quantlab.store import Store
from quantlab.techniques import parse_technique_list

REQUIRED_KEYS = {"technique", "params", "model_bytes", "gzip_bytes", "accuracy", "agreement",
                 "latency_p50_ms", "latency_p90_ms", "cached", "error"}


def json_rows(stdout: str) -> dict[str, dict]:
    rows = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    return {row["technique"]: row for row in rows}


def test_every_post_training_variant_gets_a_full_row(tiny_sweep):
    rows = json_rows(tiny_sweep["stdout"])
    assert set(rows) == set(TINY_TECHNIQUES.split(","))
    for technique, row in rows.items():
        assert REQUIRED_KEYS <= set(row), technique
        assert row["error"] is None, (technique, row["error"])
        assert row["model_bytes"] > 0 and 0 < row["gzip_bytes"]
        assert 0 <= row["latency_p50_ms"] <= row["latency_p90_ms"]
        assert row["latency_runs"] >= 5
        assert row["provenance"]["versions"]["tf-keras"]
        assert row["provenance"]["model_hash"] and row["provenance"]["dataset_hash"]


def test_only_the_int8_modes_record_a_weights_granularity(tiny_sweep):
    rows = json_rows(tiny_sweep["stdout"])
    for technique in ("float32", "float16", "dynamic", "int16x8"):
        assert "weights" not in rows[technique]["details"], technique
    for technique in ("int8-fallback", "int8-only", "uint8-only"):
        assert rows[technique]["details"]["weights"] == "per-channel", technique


def test_float32_tflite_agrees_with_keras(tiny_sweep):
    rows = json_rows(tiny_sweep["stdout"])
    assert rows["float32"]["agreement"] == 1.0
    assert rows["float32"]["sqnr_db"] > 60
    assert rows["float32"]["accuracy"] == pytest.approx(rows["baseline"]["accuracy"])


def test_sizes_are_plausible(tiny_sweep):
    rows = json_rows(tiny_sweep["stdout"])
    float32 = rows["float32"]["model_bytes"]
    assert 2.5 < float32 / rows["dynamic"]["model_bytes"] < 4.5
    assert 1.6 < float32 / rows["float16"]["model_bytes"] < 2.2
    assert rows["float32"]["float_ops"] > 0


def test_integer_only_variants_have_integer_io_and_no_float_ops(tiny_sweep):
    rows = json_rows(tiny_sweep["stdout"])
    assert (rows["int8-only"]["input_dtype"], rows["int8-only"]["output_dtype"]) == ("int8", "int8")
    assert (rows["uint8-only"]["input_dtype"], rows["uint8-only"]["output_dtype"]) == ("uint8", "uint8")
    assert rows["int8-only"]["float_ops"] == 0
    assert rows["int8-fallback"]["input_dtype"] == "float32"
    assert rows["int8-only"]["agreement"] > 0.9


def test_store_holds_exactly_the_printed_rows(tiny_sweep):
    frame = Store(tiny_sweep["db"]).results()
    printed = json_rows(tiny_sweep["stdout"])
    assert sorted(frame["row_id"]) == sorted(r["row_id"] for r in printed.values())


def test_warm_rerun_is_all_cached_and_imports_no_tensorflow(tiny_sweep):
    code = ("import sys; from quantlab.cli import main; rc = main(sys.argv[1:]); "
            "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'; sys.exit(rc)")
    args = ["sweep", *TINY_ARGS, "--techniques", TINY_TECHNIQUES, "--db", str(tiny_sweep["db"]),
            "--cache", str(tiny_sweep["cache"]), "--json"]
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = json_rows(result.stdout)
    assert len(rows) == len(TINY_TECHNIQUES.split(","))
    assert all(row["cached"] for row in rows.values())
    first = json_rows(tiny_sweep["stdout"])
    assert {t: r["accuracy"] for t, r in rows.items()} == {t: r["accuracy"] for t, r in first.items()}


def test_results_command_prints_csv_and_json(tiny_sweep):
    csv = run_cli("results", "--db", str(tiny_sweep["db"]), "--format", "csv", check=True).stdout
    assert csv.splitlines()[0].startswith("row_id,")
    lines = run_cli("results", "--db", str(tiny_sweep["db"]), "--format", "json", "--latest",
                    check=True).stdout.splitlines()
    assert len(lines) == len(TINY_TECHNIQUES.split(","))


def test_per_tensor_weights_give_each_kernel_one_scale(tiny_sweep, tmp_path):
    per_channel = json_rows(tiny_sweep["stdout"])["int8-only"]["details"]["inspection"]
    assert per_channel["weight_granularity"] == "per-channel"
    assert [op["weight_scales"] for op in per_channel["ops"] if op["weight_scales"]] == [12, 10]  # filters

    result = run_cli("sweep", *TINY_ARGS, "--techniques", "int8-only:weights=per-tensor",
                     "--db", str(tmp_path / "q.duckdb"), "--cache", str(tiny_sweep["cache"]), "--json",
                     check=True)
    row = json_rows(result.stdout)["int8-only"]
    assert row["params"] == {"weights": "per-tensor"}
    inspection = row["details"]["inspection"]
    assert inspection["weight_granularity"] == "per-tensor"
    assert [op["weight_scales"] for op in inspection["ops"] if op["weight_scales"]] == [1, 1]
    assert "int8-only(weights=per-tensor)" in result.stderr
    assert row["input_dtype"] == "int8" and row["accuracy"] > 0.5


def test_a_killed_worker_leaves_an_error_row_and_the_sweep_goes_on(tiny_sweep, tmp_path):
    store = Store(tmp_path / "q.duckdb")
    spec = SweepSpec("seed-cnn", "digits-28", parse_technique_list("dynamic,float16"),
                     train=TrainSettings(epochs=3), measure=MeasureSettings(min_runs=7, min_seconds=0.05))
    report = run_sweep(spec, store=store, cache=ArtifactCache(tiny_sweep["cache"]),
                       options=SweepOptions(workers=1, limits=PoolLimits(task_timeout_seconds=0.01)))
    assert len(report.rows) == 2
    assert all("time limit" in row["error"] for row in report.rows)
    assert store.results()["error"].notna().all()


# --- bad input: exit status 2, one line starting with "error:", store unchanged --------------------


def assert_refused(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0]


def write_pickled_npz(path):
    with zipfile.ZipFile(path, "w") as archive:
        with archive.open("x_test.npy", "w") as handle:
            np.lib.format.write_array(handle, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        with archive.open("y_test.npy", "w") as handle:
            np.lib.format.write_array(handle, np.zeros(1, dtype=np.int64))


@pytest.mark.parametrize("case", ["unknown-model", "unknown-dataset", "unknown-technique", "bad-param",
                                  "pickled-npz", "garbage-h5", "bad-threads", "zero-epochs", "endless-timing", "no-train-split",
                                  "missing-option"])
def test_bad_input_is_refused_in_one_line_and_the_store_is_unchanged(tiny_sweep, tmp_path, case):
    before = Store(tiny_sweep["db"]).count()
    base = ["sweep", "--db", str(tiny_sweep["db"]), "--cache", str(tiny_sweep["cache"])]
    if case == "unknown-model":
        result = run_cli(*base, "--model", "resnet9000", "--dataset", "digits")
        assert_refused(result, "resnet9000", "seed-cnn")
    elif case == "unknown-dataset":
        result = run_cli(*base, "--model", "seed-cnn", "--dataset", "imagenet")
        assert_refused(result, "imagenet", ".npz")
    elif case == "unknown-technique":
        result = run_cli(*base, "--model", "seed-cnn", "--dataset", "digits", "--techniques", "int3")
        assert_refused(result, "int3")
    elif case == "bad-param":
        result = run_cli(*base, "--model", "seed-cnn", "--dataset", "digits", "--techniques",
                         "dynamic:bits=4")
        assert_refused(result, "bits")
    elif case == "pickled-npz":
        npz = tmp_path / "evil.npz"
        write_pickled_npz(npz)
        result = run_cli(*base, "--model", "seed-cnn", "--dataset", str(npz))
        assert_refused(result, "evil.npz")
    elif case == "garbage-h5":
        model = tmp_path / "model.h5"
        model.write_bytes(b"this is not an HDF5 file" * 10)
        result = run_cli(*base, "--model", str(model), "--dataset", "digits", "--techniques", "dynamic")
        assert_refused(result, "model.h5")
    elif case == "bad-threads":
        result = run_cli(*base, "--model", "seed-cnn", "--dataset", "digits", "--threads", "0")
        assert_refused(result, "--threads")
    elif case == "zero-epochs":
        result = run_cli(*base, "--model", "seed-cnn", "--dataset", "digits", "--epochs", "0")
        assert_refused(result, "--epochs must be", "at least 1")
    elif case == "endless-timing":
        result = run_cli(*base, "--model", "seed-cnn", "--dataset", "digits", "--min-seconds", "inf")
        assert_refused(result, "--min-seconds must be", "finite")
    elif case == "no-train-split":  # a built-in model trains on the user's data: it needs x_train
        rng = np.random.default_rng(0)
        np.savez(tmp_path / "test_only.npz", x_test=rng.random((40, 16, 16), dtype=np.float32),
                 y_test=rng.integers(0, 3, 40))
        result = run_cli(*base, "--model", "seed-cnn", "--dataset", str(tmp_path / "test_only.npz"))
        assert_refused(result, "test_only", "x_train")
    else:
        result = run_cli("sweep", "--model", "seed-cnn")
        assert_refused(result, "--dataset")
    assert Store(tiny_sweep["db"]).count() == before


def test_rows_carry_intervals_and_p_values_cold_and_warm(tiny_sweep):
    rows = json_rows(tiny_sweep["stdout"])
    baseline, int8 = rows["baseline"], rows["int8-only"]
    low, high = int8["accuracy_ci95"]
    assert low < int8["accuracy"] < high and high - low < 0.1
    assert baseline["accuracy_change_p"] == 1.0
    assert 0 <= int8["accuracy_change_p"] <= 1 and int8["accuracy_change_p_vs_float32"] is not None
    p50_low, p50_high = int8["latency_p50_ci95_ms"]
    assert p50_low <= int8["latency_p50_ms"] <= p50_high
    assert isinstance(int8["latency_cpu_busy"], bool) and int8["test_samples"] == 450
    kept = np.load(int8["details"]["predictions"]["top1"])
    assert kept.dtype == np.uint8 and kept.shape == (450,)
    warm = run_cli("sweep", *TINY_ARGS, "--techniques", "baseline,int8-only", "--db", str(tiny_sweep["db"]),
                   "--cache", str(tiny_sweep["cache"]), "--json", check=True)
    again = json_rows(warm.stdout)["int8-only"]
    assert again["cached"] and again["accuracy_ci95"] == int8["accuracy_ci95"]
    assert again["accuracy_change_p"] == int8["accuracy_change_p"]


def test_remeasure_measures_again_what_the_cache_holds(tiny_sweep, tmp_path):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(tiny_sweep["cache"], cache)  # a copy: the shared fixture's store stays as it is
    args = ("sweep", *TINY_ARGS, "--techniques", "float32", "--db", str(tmp_path / "q.duckdb"),
            "--cache", str(cache), "--json")
    warm = [json.loads(line) for line in run_cli(*args, check=True).stdout.splitlines() if line.strip()]
    again = [json.loads(line) for line in run_cli(*args, "--remeasure", check=True).stdout.splitlines()
             if line.strip()]
    assert [row["cached"] for row in warm] == [True]
    assert [row["cached"] for row in again] == [False]
    assert again[0]["measured_at"] != warm[0]["measured_at"]


def test_the_run_page_estimate_comes_from_the_stores_measured_rows(tiny_sweep):
    from quantlab.ui_state import estimate_sweep

    store = Store(tiny_sweep["db"])
    estimate = estimate_sweep(store, ["dynamic", "float32", "qat-int8"])
    conversion = store.query("SELECT sum(conversion_seconds) FROM results WHERE technique IN "
                             "('dynamic', 'float32') AND NOT cached").iloc[0, 0]
    assert estimate.timed == 2 and estimate.untimed == ("qat-int8",)
    assert estimate.seconds >= conversion * 0.5 > 0        # medians of at least the conversion times
    assert "not timed before: qat-int8" in estimate.text()
    assert estimate_sweep(store, ["prune"]).text().startswith("No earlier rows")
    # the variants alone leave out preparing (training, the float reference, workers starting)
    walls = store.query("SELECT epoch(finished_at) - epoch(started_at) AS s FROM sweeps WHERE status = 'done' "
                        "AND sweep_id IN (SELECT sweep_id FROM results WHERE NOT cached)")  # all-cached: not counted
    assert estimate.whole_count == len(walls) >= 1
    assert estimate.whole_seconds == pytest.approx(walls["s"].median())
    assert f"took a median of {estimate.whole_seconds:.0f} s from their first variant" in estimate.text()


def test_a_dataset_without_labels_prints_agreement_where_accuracy_would_be(tmp_path):
    """Progress lines of an unlabelled sweep: each row in one line, fidelity instead of accuracy."""
    from tests import model_zoo as zoo

    model = zoo.save_keras(zoo.keras3_model(functional=True), tmp_path, "k3")
    data = zoo.save_dataset(tmp_path, "nolabels", zoo.images(40, seed=3)[0], x_calib=zoo.images(40, seed=4)[0])
    result = run_cli("sweep", "--model", str(model), "--dataset", str(data), "--techniques", "baseline,float32",
                     "--min-runs", "5", "--min-seconds", "0.02", "--db", str(tmp_path / "q.duckdb"),
                     "--cache", str(tmp_path / "cache"))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert len(lines) == 2 and all("no labels: top-1 agreement with float" in line for line in lines), lines


def test_each_training_progress_line_says_how_far_the_epoch_is():
    """Several events per epoch: each line names its step (and part of a two-stage technique), so the
    CLI never prints the same line twice in a row."""
    from quantlab.cli import _format_progress

    events = [{"type": "progress", "technique": "pqat-int8", "stage": "fine-tune", "epoch": 1, "epochs": 2,
               "step": step, "steps": 7, "loss": 1.25, "part": 1, "parts": 2} for step in (3, 6, 7)]
    lines = [_format_progress(event) for event in events]
    assert len(set(lines)) == 3
    assert lines[0] == "  pqat-int8: fine-tune (part 1 of 2) epoch 1/2, step 3/7, loss 1.2500"
    assert _format_progress({**events[0], "loss": float("nan")}).endswith("step 3/7")


def test_what_preparing_the_model_did_is_printed_when_the_sweep_starts():
    """The notes (a Keras 3 rebuild, a mixed-precision model run as float32, no labels) reached the
    manifest but no screen."""
    from quantlab.cli import _format_progress

    event = {"type": "sweep-start", "sweep_id": "s1", "total": 2,
             "manifest": {"notes": ["mixed precision (mixed_float16 in 3 of 4 layers): as float32"]}}
    assert _format_progress(event).splitlines() == [
        "sweep s1: 2 variants", "  note: mixed precision (mixed_float16 in 3 of 4 layers): as float32"]
    assert _format_progress({**event, "manifest": {"notes": []}}) == "sweep s1: 2 variants"
