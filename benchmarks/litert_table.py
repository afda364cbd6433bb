"""The LiteRT Quantizer's variants next to the converter's, from a real sweep per built-in model.

Prints a Markdown table per model (bytes, gzip bytes, accuracy, agreement with the float model, SQNR,
median latency at batch 1, and what the recipe quantized) for README's "LiteRT Quantizer" section.

    .venv/bin/python benchmarks/litert_table.py [--models seed-cnn,mobilenet] [--dataset digits-28]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantlab.cache import ArtifactCache  # noqa: E402
from quantlab.config import MeasureSettings, SweepSpec, TechniqueSpec, TrainSettings  # noqa: E402
from quantlab.runner import SweepOptions, run_sweep  # noqa: E402
from quantlab.store import Store  # noqa: E402
from quantlab.techniques import parse_technique_list, variant_label  # noqa: E402

TECHNIQUES = ("float32,dynamic,float16,int8-fallback,int8-only,lq-int8-weight-only,lq-int4-weight-only,"
              "lq-int4-dynamic,lq-int4-dynamic:algorithm=octav,lq-w8a8,lq-w8a8:ranges=min-max,lq-w8a16,"
              "lq-w4a8,lq-w4a8:ranges=min-max")


def figure(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="seed-cnn,mobilenet")
    parser.add_argument("--dataset", default="digits-28")
    parser.add_argument("--techniques", default=TECHNIQUES)
    parser.add_argument("--out", default="", help="folder for the store and cache (default: a temp folder)")
    args = parser.parse_args()
    folder = Path(args.out or tempfile.mkdtemp(prefix="litert-table-"))
    store, cache = Store(folder / "q.duckdb"), ArtifactCache(folder / "cache")
    specs = (TechniqueSpec("baseline"),) + parse_technique_list(args.techniques)
    for model in args.models.split(","):
        spec = SweepSpec(model, args.dataset, specs, TrainSettings(), MeasureSettings())
        report = run_sweep(spec, store=store, cache=cache, options=SweepOptions(workers=1, source="benchmark"))
        print(f"\n**{model} on {args.dataset}** (one worker, batch 1, 1 thread)\n")
        print("| variant | bytes | gzip bytes | accuracy | agreement | SQNR dB | p50 ms | what was quantized |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
        for row in report.rows:
            if row["technique"] == "baseline":
                continue
            details = row.get("details") or {}
            coverage = (details.get("op_coverage") or {}).get("summary", details.get("conversion", ""))
            if row.get("error"):
                print(f"| {variant_label(row['technique'], row['params'])} | error: {row['error']} |")
                continue
            print(f"| {variant_label(row['technique'], row['params'])} | {row['model_bytes']:,} | "
                  f"{row['gzip_bytes']:,} | {figure(row['accuracy'], '.4f')} | {figure(row['agreement'], '.4f')} | "
                  f"{figure(row['sqnr_db'], '.1f')} | {figure(row['latency_p50_ms'], '.4f')} | {coverage} |")


if __name__ == "__main__":
    main()
