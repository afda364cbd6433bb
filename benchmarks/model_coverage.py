"""Model coverage: every technique on every kind of user model in the zoo, from a real sweep each.

Prints a Markdown table (rows: model kinds; columns: techniques; cells: "ok", "refused" or
"failed") and, below it, every refusal and failure with its reason, for README's "Model coverage".

    .venv/bin/python benchmarks/model_coverage.py [--kinds lstm,gru] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantlab.cache import ArtifactCache  # noqa: E402
from quantlab.config import MeasureSettings, SweepSpec, TechniqueSpec, TrainSettings  # noqa: E402
from quantlab.runner import SweepOptions, run_sweep  # noqa: E402
from quantlab.store import Store  # noqa: E402
from quantlab.techniques import all_techniques, resolve_spec  # noqa: E402
from tests import model_zoo as zoo  # noqa: E402

ALL = [t.id for t in all_techniques() if t.id != "as-uploaded" and t.in_all]
TECHNIQUES = list(ALL)
FAST = MeasureSettings(min_runs=5, min_seconds=0.02, warmup_runs=2)


def build_kinds(folder: Path) -> dict[str, tuple[Path, Path]]:
    """{kind: (model file, dataset file)}, each saved the way a user would."""
    seq_x, seq_y = zoo.sequences(320)
    seq = zoo.save_dataset(folder, "seq", *zoo.sequences(120, seed=3), x_train=seq_x, y_train=seq_y)
    tok_x, tok_y = zoo.tokens(320)
    tok_xt, tok_yt = zoo.tokens(120, seed=3)
    tok = zoo.save_dataset(folder, "tok-onehot", tok_xt, zoo.one_hot(tok_yt), x_train=tok_x, y_train=tok_y)
    img_x, img_y = zoo.images(320)
    img_xt, img_yt = zoo.images(120, seed=3)
    img = zoo.save_dataset(folder, "img", img_xt, img_yt, x_train=img_x, y_train=img_y)
    unlabelled = zoo.save_dataset(folder, "img-nolabels", img_xt, x_calib=img_x[:64])
    rgb_x, rgb_y = zoo.rgb_images(160)
    rgb = zoo.save_dataset(folder, "rgb", *zoo.rgb_images(60, seed=3), x_train=rgb_x, y_train=rgb_y)
    tok_plain = zoo.save_dataset(folder, "tok", tok_xt, tok_yt, x_train=tok_x, y_train=tok_y)
    pad_x, pad_y = zoo.padded_tokens(320)
    padded = zoo.save_dataset(folder, "padded", *zoo.padded_tokens(120, seed=3), x_train=pad_x, y_train=pad_y)
    k = zoo.keras2()
    plain = k.Sequential([k.Input((16, 16, 1)), k.layers.Conv2D(4, 3), k.layers.Flatten(),
                          k.layers.Dense(zoo.CLASSES)])
    return {
        "LSTM (.h5)": (zoo.save_h5(zoo.recurrent_model("lstm"), folder, "lstm"), seq),
        "GRU (.h5)": (zoo.save_h5(zoo.recurrent_model("gru"), folder, "gru"), seq),
        "Conv1D (.h5)": (zoo.save_h5(zoo.conv1d_model(), folder, "conv1d"), seq),
        "Embedding, int32 tokens, one-hot labels": (zoo.save_h5(zoo.embedding_model(), folder, "tokens"), tok),
        "Rescaling + Normalization": (zoo.save_h5(zoo.preprocessing_model(img_x), folder, "prep"), img),
        "mini-Xception (.h5)": (zoo.save_h5(zoo.mini_xception(size=16), folder, "xception"), img),
        "Keras 3 Sequential (.keras)": (zoo.save_keras(zoo.keras3_model(False), folder, "k3s"), img),
        "Keras 3 Functional (.keras)": (zoo.save_keras(zoo.keras3_model(True), folder, "k3f"), img),
        "SavedModel (.zip)": (zoo.save_saved_model_zip(plain, folder, "sm"), img),
        "unlabelled data (mini-Xception)": (folder / "xception.h5", unlabelled),
        "two inputs, two outputs (.h5)": (zoo.save_h5(zoo.two_input_two_output_model(), folder, "multi"),
                                          zoo.save_multi_input_dataset(folder, "multi", n_train=160)),
        "Transformer encoder, MultiHeadAttention (.h5)": (zoo.save_h5(zoo.transformer_model(), folder,
                                                                      "transformer"), tok_plain),
        "Keras MobileNetV3Small (.h5)": (zoo.save_h5(zoo.keras_mobilenet_v3(), folder, "mnv3"), rgb),
        "transfer learning: a backbone inside a classifier (.h5)": (
            zoo.save_h5(zoo.transfer_model(), folder, "transfer"), img),
        "mixed precision, mixed_float16 (.h5)": (zoo.save_h5(zoo.mixed_precision_model(), folder, "mixed"), img),
        "GroupNormalization (.h5)": (zoo.save_h5(zoo.group_norm_model(), folder, "groupnorm"), img),
        "LSTM fed a mask, padded tokens (.h5)": (zoo.save_h5(zoo.masked_lstm_model(), folder, "masked"),
                                                 padded),
    }


def run_kind(folder: Path, model: Path, dataset: Path) -> dict[str, dict]:
    specs = tuple(resolve_spec(TechniqueSpec(t, {"epochs": 1} if "epochs" in
                                             {p.name for p in _technique(t).params} else {}))
                  for t in TECHNIQUES)
    spec = SweepSpec(str(model), str(dataset), specs, TrainSettings(epochs=1), FAST)
    report = run_sweep(spec, store=Store(folder / "q.duckdb"), cache=ArtifactCache(folder / "cache"),
                       options=SweepOptions(source="coverage"))
    return {row["technique"]: row for row in report.rows}


def _technique(technique_id: str):
    from quantlab.techniques import get_technique

    return get_technique(technique_id)


def cell(row: dict | None) -> str:
    if row is None:
        return "-"
    if not row.get("error"):
        return "ok"
    details = row.get("details") or {}
    return details.get("error_kind", "failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="", help="comma-separated substrings of kind names")
    parser.add_argument("--techniques", default="", help="comma-separated technique ids (default: all)")
    parser.add_argument("--out", default="", help="folder for the models, stores and caches")
    args = parser.parse_args()
    if args.techniques:
        TECHNIQUES[:] = [t.strip() for t in args.techniques.split(",") if t.strip()]
    folder = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="coverage-"))
    folder.mkdir(parents=True, exist_ok=True)
    kinds = build_kinds(folder)
    wanted = [w.strip().lower() for w in args.kinds.split(",") if w.strip()]
    results: dict[str, dict[str, dict]] = {}
    for index, (kind, (model, dataset)) in enumerate(kinds.items()):
        if wanted and not any(w in kind.lower() for w in wanted):
            continue
        started = time.perf_counter()
        results[kind] = run_kind(folder / f"kind{index}", model, dataset)
        print(f"{kind}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    print("| model kind | " + " | ".join(f"`{t}`" for t in TECHNIQUES) + " |")
    print("|---|" + "---|" * len(TECHNIQUES))
    for kind, rows in results.items():
        print(f"| {kind} | " + " | ".join(cell(rows.get(t)) for t in TECHNIQUES) + " |")
    print()
    for kind, rows in results.items():
        for technique in TECHNIQUES:
            row = rows.get(technique)
            if row is not None and row.get("error"):
                print(f"- {kind}, `{technique}` ({cell(row)}): {row['error']}")
    ok = sum(cell(r) == "ok" for rows in results.values() for r in rows.values())
    total = sum(len(rows) for rows in results.values())
    print(f"\n{ok} of {total} variants gave a full row.")


if __name__ == "__main__":
    main()
