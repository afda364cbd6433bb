"""Users' models on Ray, where every file travels: the zoo's kinds give the pool's rows.

On a cluster a task cannot read the driver's disk, so the user's model (a file, a zipped SavedModel
folder, a Keras 3 file with its rebuilt twin), the dataset, the float reference of every output and
a shared fine-tuned model are shipped to the node's cache and the results come back. The Ray here is
started by the test process, not by QuantLab, so its tasks take that path though they run on this
machine.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests import model_zoo as zoo
from quantlab.cache import ArtifactCache
from quantlab.config import MeasureSettings, SweepSpec, TechniqueSpec, TrainSettings, content_hash
from quantlab.ray_executor import LOCAL_NODE_CACHE
from quantlab.runner import SweepOptions, run_sweep
from quantlab.store import Store
from quantlab.techniques import resolve_spec

FAST = MeasureSettings(min_runs=5, min_seconds=0.02, warmup_runs=2)
COMPARED = ("error", "model_bytes", "gzip_bytes", "accuracy", "agreement", "sqnr_db")
FINE_TUNES = {"qat-int8"}


def lstm_on_sequences(mine: Path) -> tuple[Path, Path, str | None]:
    x, y = zoo.sequences(160)
    model = zoo.recurrent_model("lstm")
    zoo.train_briefly(model, x, y)
    data = zoo.save_dataset(mine, "seq", *zoo.sequences(60, seed=3), x_train=x, y_train=y)
    return zoo.save_h5(model, mine, "lstm"), data, None


def savedmodel_on_unlabelled_images(mine: Path) -> tuple[Path, Path, str | None]:
    x, y = zoo.images(120)
    model = zoo.mini_xception(16)
    zoo.train_briefly(model, x, y)
    data = zoo.save_dataset(mine, "nolabels", zoo.images(40, seed=3)[0], x_calib=zoo.images(40, seed=4)[0])
    return zoo.save_saved_model_zip(model, mine, "xception"), data, None


def keras3_on_images(mine: Path) -> tuple[Path, Path, str | None]:
    x, y = zoo.images(120)
    data = zoo.save_dataset(mine, "img", *zoo.images(40, seed=3), x_train=x, y_train=y)
    return zoo.save_keras(zoo.keras3_model(functional=True), mine, "k3"), data, None


def two_inputs_two_outputs(mine: Path) -> tuple[Path, Path, str | None]:
    model = zoo.two_input_two_output_model()
    return zoo.save_h5(model, mine, "two"), zoo.save_multi_input_dataset(mine, "two", n_train=64), "label_head"


CASES = {  # kind -> (how to make it, techniques): each case's techniques read what that kind adds
    "recurrent (LSTM), a fine-tune it cannot take": (lstm_on_sequences, ("float32", "dynamic", "qat-int8")),
    "zipped SavedModel, data without labels": (savedmodel_on_unlabelled_images,
                                               ("float32", "int8-only", "lq-int8-weight-only")),
    "Keras 3 file": (keras3_on_images, ("baseline", "dynamic", "lq-w8a8")),
    "two inputs (one of int32 tokens), two outputs": (two_inputs_two_outputs, ("int8-only", "qat-int8")),
}


def sweep(folder: Path, model: Path, dataset: Path, label_output: str | None, techniques: tuple[str, ...],
          ray: str | None) -> dict[str, dict]:
    spec = SweepSpec(str(model), str(dataset),
                     tuple(resolve_spec(TechniqueSpec(t, {"epochs": 1} if t == "qat-int8" else {}))
                           for t in techniques),
                     TrainSettings(epochs=1), FAST, label_output=label_output)
    report = run_sweep(spec, store=Store(folder / "q.duckdb"), cache=ArtifactCache(folder / "cache"),
                       options=SweepOptions(ray=ray))
    return {row["technique"]: row for row in report.rows}


@pytest.mark.parametrize("kind", CASES)
def test_a_users_model_gives_the_pools_rows_when_its_files_travel_to_the_node(kind, ray_local, tmp_path):
    make, techniques = CASES[kind]
    mine = tmp_path / "mine"
    mine.mkdir()
    model, dataset, label_output = make(mine)
    on_pool = sweep(tmp_path / "pool", model, dataset, label_output, techniques, None)
    on_ray = sweep(tmp_path / "ray", model, dataset, label_output, techniques, "auto")

    assert sorted(on_ray) == sorted(on_pool) == sorted(techniques)
    for technique, row in on_ray.items():
        assert row["executor"] == ("ray" if row["error"] is None else on_pool[technique]["executor"]), technique
        if technique in FINE_TUNES and row["error"] is None:  # trained in each run: same size, close quality
            assert (row["model_bytes"], row["error"]) == (on_pool[technique]["model_bytes"], None), technique
            assert abs(row["accuracy"] - on_pool[technique]["accuracy"]) <= 0.05, technique
            continue
        assert {c: row.get(c) for c in COMPARED} == {c: on_pool[technique].get(c) for c in COMPARED}, technique
    assert sum(row["error"] is None for row in on_ray.values()) >= len(techniques) - 1
    # The user's files reached the tasks through the node's own cache, not the driver's disk.
    driver_key = content_hash({"host": socket.gethostname(), "cache": str((tmp_path / "ray" / "cache").resolve())}, 12)
    shipped = {path.name for path in (LOCAL_NODE_CACHE / driver_key / "external").rglob("*")}
    assert {model.name, dataset.name} <= shipped
