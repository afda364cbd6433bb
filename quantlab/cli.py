"""`python -m quantlab ...`: list workloads and techniques, run sweeps, read results.

Domain errors become one line on stderr starting with `error:` and exit status 2; results go to
stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

from .cache import DEFAULT_CACHE_DIR, ArtifactCache
from .config import MeasureSettings, SweepSpec, TrainSettings
from .errors import QuantLabError, without_technique
from .store import DEFAULT_DB_PATH, Store
from .techniques import variant_label

TABLE_COLUMNS = ("technique", "model_bytes", "gzip_bytes", "accuracy", "agreement", "sqnr_db",
                 "latency_p50_ms", "latency_p90_ms", "cached", "executor", "node", "error")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise QuantLabError(f"{message}; run `python -m quantlab {self.prog.split()[-1]} --help` for usage")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="quantlab", description="Compare TensorFlow Lite quantization trade-offs.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    listing = commands.add_parser("workloads", help="list the built-in datasets and models")
    listing.add_argument("--json", action="store_true")
    techniques = commands.add_parser("techniques", help="list the techniques and their parameters")
    techniques.add_argument("--json", action="store_true")

    sweep = commands.add_parser("sweep", help="convert and measure every technique on one model")
    sweep.add_argument("--model", required=True, help="built-in model name or a model file")
    sweep.add_argument("--dataset", required=True, help="built-in dataset name or a .npz file")
    sweep.add_argument("--techniques", default="all",
                       help="all, or ids separated by commas; parameters as id:name=value;name=value")
    sweep.add_argument("--db", type=Path, default=DEFAULT_DB_PATH)
    sweep.add_argument("--cache", type=Path, default=DEFAULT_CACHE_DIR)
    sweep.add_argument("--threads", type=int, default=1, help="LiteRT interpreter threads for latency")
    sweep.add_argument("--workers", type=int, default=None, help="worker processes (default: up to 2)")
    sweep.add_argument("--epochs", type=int, default=TrainSettings.epochs, help="baseline training epochs")
    sweep.add_argument("--label-output", default=None,
                       help="a model with several outputs: the output the labels belong to (default: "
                            "the first classifier output)")
    sweep.add_argument("--min-runs", type=int, default=MeasureSettings.min_runs)
    sweep.add_argument("--min-seconds", type=float, default=MeasureSettings.min_seconds)
    sweep.add_argument("--json", action="store_true", help="one JSON object per variant on stdout")
    sweep.add_argument("--remeasure", action="store_true",
                       help="measure every variant again instead of reusing cached results (e.g. "
                            "latency timed while the machine was busy)")

    sweep.add_argument("--ray", default=None, metavar="ADDRESS",
                       help="run the variants as Ray tasks: local (start Ray with this machine's cores), "
                            "auto (RAY_ADDRESS or the `ray start` cluster here) or host:port of a head")

    plan = commands.add_parser("plan", help="run a plan file: models x datasets x techniques (x threads)")
    plan.add_argument("file", type=Path, help="a .toml plan (see quantlab/plans.py for its keys)")
    plan.add_argument("--db", type=Path, default=DEFAULT_DB_PATH)
    plan.add_argument("--cache", type=Path, default=DEFAULT_CACHE_DIR)
    plan.add_argument("--ray", default=None, metavar="ADDRESS",
                      help="run the sweeps side by side on Ray (local, auto or host:port); default: "
                           "one after the other on the local worker pool")
    plan.add_argument("--workers", type=int, default=None, help="pool worker processes (default: up to 2)")
    plan.add_argument("--json", action="store_true", help="the summary as one JSON object per sweep")

    results = commands.add_parser("results", help="print stored results")
    results.add_argument("--db", type=Path, default=DEFAULT_DB_PATH)
    results.add_argument("--format", choices=("table", "csv", "json"), default="table")
    results.add_argument("--latest", action="store_true", help="only the newest row per variant")
    return parser


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, float) and value != value:
        return None
    return value


def row_to_json(row: dict[str, Any]) -> str:
    return json.dumps({k: _jsonable(v) for k, v in row.items()}, default=str, sort_keys=False)


class _RowPrinter:
    """Prints variant rows as JSON lines with their intervals and p-values (uncertainty.json_fields).

    The p-values pair a row with the baseline and float32 rows of its model/dataset version, so a
    row that finishes before this sweep's own baseline or float32 waits until those are measured.
    """

    def __init__(self, store: Store, techniques: Sequence[str]) -> None:
        from .uncertainty import REFERENCE_TECHNIQUES

        self.store = store
        self.waiting_for = {t for t in REFERENCE_TECHNIQUES if t in techniques}
        self.held: list[dict[str, Any]] = []
        self.references: dict[tuple, dict] = {}

    def add(self, row: dict[str, Any]) -> None:
        self.waiting_for.discard(row["technique"])
        self.held.append(row)
        if not self.waiting_for:
            self.flush()

    def flush(self) -> None:
        for row in self.held:
            print(row_to_json(with_uncertainty(row, self.store, self.references)), flush=True)
        self.held = []


def with_uncertainty(row: dict[str, Any], store: Store, memo: dict[tuple, dict] | None = None) -> dict[str, Any]:
    """`row` with the --json interval fields and its p-values against the stored references."""
    from . import uncertainty

    if row.get("error") and not isinstance(row.get("error"), float):
        return {**row, **uncertainty.json_fields({})}
    memo = {} if memo is None else memo
    key = (row.get("model_hash"), row.get("dataset_hash"))
    if key not in memo:
        memo[key] = uncertainty.stored_references(store, *key)
    return {**row, **uncertainty.json_fields(row, uncertainty.change_fields(row, memo[key]))}


def _describe_quality(row: dict) -> str:
    """Accuracy where the dataset has labels, else agreement with the float model."""
    if row.get("accuracy") is not None:
        return f"accuracy {row['accuracy']:.4f}"
    if row.get("agreement") is not None:
        return f"no labels: top-1 agreement with float {row['agreement']:.4f}"
    return "no labels and no float model to agree with"


def _describe_training_step(event: dict) -> str:
    """"fine-tune (part 1 of 2) epoch 1/2, step 4/7, loss 1.0986": each event of an epoch says how far."""
    part = f" (part {event['part']} of {event['parts']})" if "part" in event else ""
    line = f"{event.get('stage', '')}{part} epoch {event['epoch']}/{event.get('epochs', '?')}"
    if "step" in event:
        line += f", step {event['step']}/{event.get('steps', '?')}"
    if isinstance(event.get("loss"), float) and math.isfinite(event["loss"]):
        line += f", loss {event['loss']:.4f}"
    return line


def _format_progress(event: dict) -> str | None:
    kind = event.get("type")
    if kind in ("variant-done", "variant-failed"):
        row = event["row"]
        head = f"[{event['done']}/{event['total']}] {variant_label(row['technique'], row.get('params'))}"
        if row.get("error"):
            return f"{head}: failed: {without_technique(row['technique'], row['error'])}"
        parts = [f"{row['model_bytes']:,} bytes" if row.get("model_bytes") is not None else "size not measured",
                 _describe_quality(row)]
        if row.get("latency_p50_ms") is not None:
            parts.append(f"p50 {row['latency_p50_ms']:.3f} ms")
        return f"{head}: {', '.join(parts)}{' (cached)' if row.get('cached') else ''}"
    if kind == "progress":
        where = event.get("technique") or "prepare"
        if "epoch" in event:
            return f"  {where}: {_describe_training_step(event)}"
        return f"  {where}: {event.get('message', event.get('stage', ''))}"
    if kind == "sweep-start":
        notes = (event.get("manifest") or {}).get("notes") or []
        return "\n".join([f"sweep {event['sweep_id']}: {event['total']} variants",
                          *(f"  note: {note}" for note in notes)])
    if kind == "prepare":
        return event["message"]
    return None


FLAG_OF_SETTING = {"epochs": "--epochs", "num_threads": "--threads", "min_runs": "--min-runs",
                   "min_seconds": "--min-seconds"}


def settings_from_flags(make: Callable[[], Any]) -> Any:
    """Build settings from command-line flags; a refused value is named by its flag, not its field."""
    try:
        return make()
    except QuantLabError as error:
        name, _, rest = str(error).partition(" ")
        if name not in FLAG_OF_SETTING:
            raise
        raise QuantLabError(f"{FLAG_OF_SETTING[name]} {rest}") from None


def command_sweep(args: argparse.Namespace) -> int:
    from .runner import SweepOptions, guess_model_kind, resolve_model, run_sweep
    from .techniques import parse_technique_list

    if args.threads < 1 or (args.workers is not None and args.workers < 1):
        raise QuantLabError("--threads and --workers must be at least 1")
    kind = guess_model_kind(resolve_model(args.model))
    spec = SweepSpec(model=args.model, dataset=args.dataset,
                     techniques=parse_technique_list(args.techniques, kind),
                     train=settings_from_flags(lambda: TrainSettings(epochs=args.epochs)),
                     measure=settings_from_flags(lambda: MeasureSettings(
                         num_threads=args.threads, min_runs=args.min_runs, min_seconds=args.min_seconds)),
                     label_output=args.label_output)

    # Checking the inputs happens in a worker; until it passes (training starts or the sweep does),
    # progress is held back so that a refused input prints exactly one `error:` line.
    held: list[str] | None = []
    store = Store(args.db)
    printer = _RowPrinter(store, [t.id for t in spec.techniques])

    def on_event(event: dict) -> None:
        nonlocal held
        line = _format_progress(event)
        if held is not None and (event.get("type") == "sweep-start" or "epoch" in event):
            if held:
                print("\n".join(held), file=sys.stderr, flush=True)
            held = None
        if line and held is not None:
            held.append(line)
        elif line:
            print(line, file=sys.stderr, flush=True)
        if args.json and event.get("type") in ("variant-done", "variant-failed"):
            printer.add(event["row"])

    try:
        report = run_sweep(spec, store=store, cache=ArtifactCache(args.cache), on_event=on_event,
                           options=SweepOptions(workers=args.workers, source="cli",
                                                remeasure=args.remeasure, ray=args.ray or None))
    finally:
        if args.json:
            printer.flush()  # rows still waiting for a reference that failed or never came
    if not args.json:
        _print_table([{**{k: r.get(k) for k in TABLE_COLUMNS},
                       "technique": variant_label(r["technique"], r.get("params"))} for r in report.rows])
    return 1 if report.failed and len(report.failed) == len(report.rows) else 0


def command_plan(args: argparse.Namespace) -> int:
    from .plans import load_plan, run_plan

    plan = load_plan(args.file)
    store = Store(args.db)
    count = len(plan.models) * len(plan.datasets) * len(plan.threads)
    where = f"side by side on Ray ({args.ray})" if args.ray else "one after the other on the local pool"
    print(f"plan {plan.plan_id}: {count} sweeps {where}", file=sys.stderr, flush=True)

    def on_sweep(done: int, total: int, result: Any) -> None:
        s = result.summary()
        what = f"[{done}/{total}] {s['model']} on {s['dataset']}, threads={s['threads']}"
        if result.error:
            print(f"{what}: failed: {result.error}", file=sys.stderr, flush=True)
        else:
            print(f"{what}: {s['variants']} variants ({s['cached']} cached, {s['failed']} failed) in "
                  f"{s['seconds']:.1f} s", file=sys.stderr, flush=True)

    report = run_plan(plan, store=store, cache=ArtifactCache(args.cache), ray=args.ray, on_sweep=on_sweep,
                      workers=args.workers)
    summaries = [{"plan_id": report.plan_id, **s.summary()} for s in report.sweeps]
    if args.json:
        for summary in summaries:
            print(json.dumps(summary))
    else:
        _print_table([{k: v for k, v in s.items() if k != "plan_id"} for s in summaries])
        print(f"plan {report.plan_id}: {len(summaries)} sweeps in {report.seconds:.1f} s on {report.executor}")
    return 0 if report.ok else 1


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _print_table(rows: list[dict]) -> None:
    """A plain text table (no pandas: a warm sweep should start and finish in well under a second)."""
    if not rows:
        print("(no results)")
        return
    columns = list(rows[0])
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for line in cells:
        print("  ".join(v.rjust(w) for v, w in zip(line, widths)))


def command_results(args: argparse.Namespace) -> int:
    store = Store(args.db, read_only=True)
    if not store.exists():
        raise QuantLabError(f"no results database at {args.db}; run `python -m quantlab sweep` first "
                            f"or pass --db")
    frame = store.results(latest_only=args.latest)
    if args.format == "csv":
        frame.to_csv(sys.stdout, index=False)
    elif args.format == "json":
        memo: dict[tuple, dict] = {}
        for record in frame.to_dict(orient="records"):
            print(row_to_json(with_uncertainty(record, store, memo)))
    else:
        columns = [c for c in ("model_name", "dataset_name", *TABLE_COLUMNS) if c in frame.columns]
        _print_table(frame[columns].to_dict(orient="records") if not frame.empty else [])
    return 0


def command_workloads(args: argparse.Namespace) -> int:
    from .workloads import BUILTIN_DATASETS, BUILTIN_MODELS

    data = {"datasets": [{"name": d.name, "description": d.description, "needs_network": d.needs_network}
                         for d in BUILTIN_DATASETS.values()],
            "models": [{"name": m.name, "description": m.description} for m in BUILTIN_MODELS.values()]}
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print("datasets:")
    for d in data["datasets"]:
        print(f"  {d['name']:<14} {d['description']}")
    print("models:")
    for m in data["models"]:
        print(f"  {m['name']:<14} {m['description']}")
    print("files: --model accepts .keras, .h5, SavedModel .zip or folder, .tflite; --dataset a .npz with "
          "x_test, y_test and optionally x_train/y_train or x_calib")
    return 0


def command_techniques(args: argparse.Namespace) -> int:
    from .techniques import all_techniques, unsupported_techniques

    if args.json:
        print(json.dumps({"techniques": [t.to_dict() for t in all_techniques()],
                          "unsupported": unsupported_techniques()}, indent=2))
        return 0
    for technique in all_techniques():
        print(f"{technique.id:<16} [{technique.family}] {technique.description}")
        for param in technique.params:
            accepted = f" one of {', '.join(map(str, param.choices))}" if param.choices else ""
            print(f"    {param.name}={param.default!r}{accepted}: {param.help}")
    for technique_id, reason in unsupported_techniques().items():
        print(f"{technique_id:<16} [not available here] {reason}")
    return 0


COMMANDS = {"sweep": command_sweep, "plan": command_plan, "results": command_results, "workloads": command_workloads,
            "techniques": command_techniques}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "db", None):  # sweeps left `running` by a killed process: `interrupted`
            Store(args.db).mark_interrupted_sweeps()
        if getattr(args, "ray", None):
            from .ray_executor import native_stderr_aside  # imports no Ray

            with native_stderr_aside():
                return COMMANDS[args.command](args)
        return COMMANDS[args.command](args)
    except QuantLabError as exc:
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; results recorded so far are kept", file=sys.stderr)
        return 130


def run_command_line(argv: Sequence[str] | None = None) -> int:
    """`python -m quantlab`: `main`, in a child process for a Ray run (`child_run` says why)."""
    try:
        args = build_parser().parse_args(argv)
    except QuantLabError:
        return main(argv)  # which says the one-line error
    if not getattr(args, "ray", None):
        return main(argv)
    from .child_run import run_in_child

    def explain(child: int, code: int) -> str:
        try:
            marked = f"{len(Store(args.db).fail_sweeps_of_process(child))} sweep(s) marked failed"
        except Exception as exc:  # the last word of the run: a traceback here would hide it
            marked = f"its sweeps stay running until the next run marks them ({type(exc).__name__})"
        kept = f"{marked}; rows recorded so far are kept, run it again to finish (finished variants are cached)"
        if code < 0:
            return f"the run's process was killed by {signal.Signals(-code).name} (out of memory?); {kept}"
        head = "the Ray QuantLab started here" if args.ray == "local" else f"the Ray head at {args.ray!r}"
        return (f"lost the connection to {head}: the Ray node on this machine stopped and Ray's client "
                f"ended the run (exit status {code}); {kept}")

    return run_in_child(lambda: main(argv), explain)
