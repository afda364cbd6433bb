"""The DuckDB store: migrations, complete rows, filters, read-only mode, two writers."""

import multiprocessing

import duckdb
import pytest

from quantlab.errors import StoreError
from quantlab.store import MIGRATIONS, RESULT_COLUMNS, Store, _result_values


def make_row(technique: str = "dynamic", **overrides) -> dict:
    row = {"sweep_id": "s1", "result_key": f"k-{technique}", "cached": False, "model_name": "m",
           "model_hash": "mh", "dataset_name": "d", "dataset_hash": "dh", "technique": technique,
           "family": "ptq", "params": {}, "model_bytes": 1000, "accuracy": 0.9}
    row.update(overrides)
    return row


def test_migrations_are_recorded_once(tmp_path):
    store = Store(tmp_path / "q.duckdb")
    assert store.migrate() == [v for v, _, _ in MIGRATIONS]
    assert store.migrate() == []
    assert store.schema_versions() == [v for v, _, _ in MIGRATIONS]


def make_old_store(store: Store, version: int, rows: list[dict]) -> None:
    """A store as `version` left it, holding `rows` (written with the columns it had)."""
    with store.connect() as con:
        con.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, description VARCHAR, "
                    "applied_at TIMESTAMPTZ)")
        for number, _, statements in MIGRATIONS[:version]:
            for statement in statements:
                con.execute(statement)
            con.execute("INSERT INTO schema_migrations VALUES (?, 'old', now())", [number])
        columns = [name for name, _ in RESULT_COLUMNS]
        for row in rows:
            values = _result_values(row)
            con.execute(f"INSERT INTO results ({', '.join(columns)}) VALUES "
                        f"({', '.join('?' for _ in columns)})", [values.get(c) for c in columns])


def test_migration_2_gives_old_int8_rows_their_default_weights(tmp_path):
    store = Store(tmp_path / "q.duckdb")
    make_old_store(store, 1, [make_row("int8-only", result_key="old", params={}),
                              make_row("dynamic", params={}),
                              make_row("int8-only", result_key="new", params={"weights": "per-channel"})])
    assert store.migrate() == [2, 3, 4, 5]
    latest = store.results(latest_only=True)
    assert sorted(latest["technique"]) == ["dynamic", "int8-only"]  # one int8-only variant, not two
    params = dict(zip(store.results()["result_key"], store.results()["params"]))
    assert params["old"] == params["new"] == '{"weights": "per-channel"}'
    assert store.results(latest_only=True).set_index("technique").loc["dynamic", "params"] == "{}"


def test_migration_3_adds_empty_intervals_to_old_rows(tmp_path):
    store = Store(tmp_path / "q.duckdb")
    make_old_store(store, 2, [make_row("dynamic")])
    assert store.migrate() == [3, 4, 5]
    old = store.results().iloc[0]
    assert old["accuracy"] == 0.9 and old[["accuracy_ci_low", "latency_cpu_busy"]].isna().all()
    row_id = store.insert_result(make_row("int8-only", accuracy_ci_low=0.85, accuracy_ci_high=0.93,
                                          latency_cpu_busy=True, test_samples=450))
    assert store.row(row_id)["accuracy_ci_high"] == 0.93


def test_inserted_row_reads_back_with_json_columns(tmp_path):
    store = Store(tmp_path / "q.duckdb")
    store.migrate()
    row_id = store.insert_result(make_row(params={"bits": 8}, details={"ops": ["CONV_2D"]}))
    row = store.row(row_id)
    assert row["technique"] == "dynamic"
    assert row["params"] == {"bits": 8}
    assert row["details"] == {"ops": ["CONV_2D"]}


def test_a_row_with_an_unknown_column_is_refused_whole(tmp_path):
    store = Store(tmp_path / "q.duckdb")
    store.migrate()
    with pytest.raises(ValueError):
        store.insert_result(make_row(bogus=1))
    assert store.count() == 0


def test_a_batch_of_rows_goes_in_whole_or_not_at_all(tmp_path):
    store = Store(tmp_path / "q.duckdb")
    store.migrate()
    ids = store.insert_results([make_row("dynamic"), make_row("float16")])
    assert len(set(ids)) == 2 and store.count() == 2
    with pytest.raises(ValueError):
        store.insert_results([make_row("int8-only"), make_row("uint8-only", bogus=1)])
    duplicate = make_row("int16x8", row_id=ids[0])   # the primary key fails inside the transaction
    with pytest.raises(duckdb.ConstraintException):
        store.insert_results([make_row("int8-fallback"), duplicate])
    assert sorted(store.results()["technique"]) == ["dynamic", "float16"]


def test_latest_only_keeps_the_newest_row_per_variant(tmp_path):
    store = Store(tmp_path / "q.duckdb")
    store.migrate()
    store.insert_result(make_row(accuracy=0.5))
    store.insert_result(make_row(accuracy=0.7))
    store.insert_result(make_row("float16"))
    latest = store.results(latest_only=True)
    assert sorted(latest["technique"]) == ["dynamic", "float16"]
    assert latest.loc[latest.technique == "dynamic", "accuracy"].item() == 0.7
    assert len(store.results()) == 3


def test_filters_are_parameters_not_sql(tmp_path):
    store = Store(tmp_path / "q.duckdb")
    store.migrate()
    store.insert_result(make_row())
    assert store.results(model_name="m' OR '1'='1").empty
    assert len(store.results(model_name="m")) == 1


def test_read_only_store_refuses_writes_and_reads_a_missing_file_as_empty(tmp_path):
    missing = Store(tmp_path / "none.duckdb", read_only=True)
    assert missing.results().empty
    writable = Store(tmp_path / "q.duckdb")
    writable.migrate()
    with pytest.raises(StoreError, match="read-only"):
        Store(tmp_path / "q.duckdb", read_only=True).insert_result(make_row())


def _write_rows(path: str, prefix: str, count: int) -> None:
    store = Store(path)
    store.migrate()
    for i in range(count):
        store.insert_result(make_row(f"{prefix}{i}"))


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    path = str(tmp_path / "q.duckdb")
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_write_rows, args=(path, p, 25)) for p in ("a", "b")]
    from quantlab.pool import neutral_main

    with neutral_main():  # an AppTest earlier in this process may have left a page as __main__
        for writer in writers:
            writer.start()
    for writer in writers:
        writer.join(120)
    assert [w.exitcode for w in writers] == [0, 0]
    techniques = Store(path).results()["technique"]
    assert len(techniques) == 50 and techniques.nunique() == 50


def test_threads_of_one_process_reading_and_writing_at_once_lose_nothing(tmp_path):
    """The Streamlit server: page scripts read (some through read-only stores) while sweep threads write."""
    import threading

    writer = Store(tmp_path / "q.duckdb")
    writer.migrate()
    reader = Store(tmp_path / "q.duckdb", read_only=True)
    failures: list[str] = []

    def write(thread: int) -> None:
        for index in range(10):
            try:
                writer.insert_result(make_row(f"t{thread}-{index}"))
            except Exception as exc:  # noqa: BLE001 - every failure is reported below
                failures.append(f"write: {exc}")

    def read() -> None:
        for _ in range(10):
            try:
                writer.count()
                reader.results(latest_only=True)
            except Exception as exc:  # noqa: BLE001
                failures.append(f"read: {exc}")

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    threads += [threading.Thread(target=read) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert writer.count() == 4 * 10


def test_migration_5_adds_executor_node_and_plan_id_empty_on_old_rows(tmp_path):
    store = Store(tmp_path / "q.duckdb")
    make_old_store(store, 3, [make_row("dynamic")])
    with store.connect() as con:
        con.execute("INSERT INTO sweeps VALUES ('old', now(), NULL, 'm', 'd', '{}', 'done', 'cli')")
    assert store.migrate() == [4, 5]
    old = store.results().iloc[0]
    assert old["executor"] is None and old["node"] is None
    assert store.sweeps()["plan_id"].isna().all()
    sweep = store.start_sweep("m", "d", {}, "plan", plan_id="zoo-1234")
    store.insert_result(make_row("float32", sweep_id=sweep, executor="ray", node="vm/abcd"))
    assert store.sweeps().set_index("sweep_id").loc[sweep, "plan_id"] == "zoo-1234"
    assert store.results().set_index("technique").loc["float32", "node"] == "vm/abcd"
