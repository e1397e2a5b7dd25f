"""Ensembles of runs on a real-image set: hand, equal, searched weights and a stack, cross-fold vs held-out test.

    .venv/bin/python -m benchmarks.bench_switches --set hpa --work-dir W      # trains the runs (every fold)
    .venv/bin/python -m benchmarks.bench_ensembles --set hpa --work-dir W --runs base,mixup,lovasz
    .venv/bin/python -m benchmarks.bench_ensembles --smoke                    # end to end on a tiny run, seconds

The runs are the rows of a ``benchmarks.bench_switches`` run kept with ``--work-dir`` (the same set, size and
folds options must be given here): every fold trained on one folds file, so their OOF scores cover the same
rows. Each way of combining them is one ``src.predict`` of ``predict.runs`` (``predict.force=true``):

- hand: ``predict.weights=hand`` with ``--hand`` (default: the first run 2, the others 1);
- equal: ``predict.weights=equal``;
- search: ``predict.weights=search`` (non-negative weights that maximise the metric after the decision on OOF);
- stack: ``predict.stack=logistic`` (a logistic regression per class over the runs' scores, cross-fitted);
- auto: ``predict.weights=auto`` with the stack as a candidate: what ``auto`` picks by the cross-fold estimate.

Recorded per way: the cross-fold estimate of the way (the auto prediction's ``report/ensembles.csv``, which compares
them all: fitted on the other folds, scored on each fold) and, for comparison, the in-sample figure (fitted and
scored on every OOF row: what a search "wins" by construction), and the submission scored against the set's hidden
labels. The single runs come first (their own predictions, from the switches run). If searching or stacking
overfits, the cross-fold column rises while test falls; the table says so in its last column.

Writes ``ensembles_<set>.csv`` and ``.md`` to ``--out`` (default benchmarks/results/ensembles) and prints them.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from benchmarks.bench_recipes import chosen_strategy, submitted_matrix
from benchmarks.bench_switches import BY_KEY, SWITCHES, prepare, row_config, run_switch
from benchmarks.bench_switches import parse_args as switches_args
from benchmarks.common import REPO_ROOT, limit_cpu_threads, work_folder
from benchmarks.recipe_sets import set_metric
from src.cli import run_cli
from src.config import override
from src.predict import predict

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "ensembles"
WAYS = {"hand": {"predict.weights": "hand"}, "equal": {"predict.weights": "equal"},
        "search": {"predict.weights": "search"}, "stack": {"predict.stack": "logistic"},
        "auto": {"predict.weights": "auto", "predict.stack": "logistic"}}


@dataclass
class Row:
    name: str
    in_sample: float
    cross_fold: float
    test: float
    notes: str


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=True)
    parser.add_argument("--runs", default="base,mixup,lovasz", help="bench_switches rows to ensemble (names)")
    parser.add_argument("--hand", help="hand weights, one per run, comma-separated (default: 2 for the first, 1 "
                                       "for the others)")
    own, rest = parser.parse_known_args(argv)
    args = switches_args(rest + (["--rows", own.runs] if not any(a.startswith("--rows") for a in rest) else []))
    args.runs = [BY_KEY[name].key if name in BY_KEY else name for name in own.runs.split(",")]
    unknown = [name for name in args.runs if name not in {s.key for s in SWITCHES}]
    if unknown or len(args.runs) < 2:
        raise SystemExit(f"--runs: give two or more of {[s.key for s in SWITCHES]} (unknown: {unknown})")
    args.hand = [float(w) for w in own.hand.split(",")] if own.hand else [2.0] + [1.0] * (len(args.runs) - 1)
    if len(args.hand) != len(args.runs):
        raise SystemExit(f"--hand: {len(args.hand)} weights for {len(args.runs)} runs")
    args.argv = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    limit_cpu_threads(args.threads)
    metric, score = set_metric(args.set)
    with work_folder(args.work_dir, "bench_ensembles_") as work_dir:
        work_dir = work_dir.resolve()
        bench = prepare(args, work_dir)
        rows = []
        for name in args.runs:  # the runs, trained here when the work folder does not hold them yet
            switch = BY_KEY[name]
            cfg = row_config(switch, bench, args, work_dir)
            submission = Path(cfg.submission.path)
            if not (Path(cfg.run.dir) / "decision.json").is_file():
                run_switch(switch, bench, args, work_dir)
            strategy, oof = chosen_strategy(cfg)
            rows.append(Row(f"run {name}", float("nan"), oof,
                            score(bench.test_y, submitted_matrix(submission, cfg, bench.test_ids, bench.codes)),
                            f"alone; OOF {strategy}"))
        base = row_config(BY_KEY[args.runs[0]], bench, args, work_dir)
        runs = [{"dir": str(work_dir / "runs" / name), "weight": weight} for name, weight in zip(args.runs, args.hand)]
        # One predict per way: its submission is that way's test score. The estimates of every way come from
        # auto's report (ensembles.csv compares hand, equal, search and stack; hand alone compares nothing).
        estimates, tests, applied = {}, {}, {}
        for way in ["auto", *[w for w in WAYS if w != "auto"]]:
            out_dir = work_dir / "ensembles" / way
            cfg = override(base, **{"run.dir": str(out_dir), "submission.path": str(out_dir / "submission.csv"),
                                    "predict.runs": runs, "predict.force": True, **WAYS[way]})
            out_dir.mkdir(parents=True, exist_ok=True)
            submission = predict(cfg, progress=args.progress)
            tests[way] = score(bench.test_y, submitted_matrix(Path(submission), cfg, bench.test_ids, bench.codes))
            if way == "auto":
                table = pd.read_csv(out_dir / "report" / "ensembles.csv", keep_default_na=False)
                for _, line in table.iterrows():
                    estimates[line["ensemble"]] = (float(line.filter(like="in_sample").iloc[0]),
                                                   float(line.filter(like="cross_fold").iloc[0]), line["blend"])
                applied["auto"] = table[table["chosen"] == "<-"].iloc[0]["ensemble"]
        for way in WAYS:
            name = applied["auto"] if way == "auto" else way
            in_sample, cross_fold, blend = estimates[name]
            notes = f"auto picked {name} by its cross-fold estimate" if way == "auto" else blend
            rows.append(Row(way, in_sample, cross_fold, tests[way], notes))
            print(f"{way}: in-sample {in_sample:.4f}, cross-fold {cross_fold:.4f}, test {tests[way]:.4f}", flush=True)
        hand = next(r for r in rows if r.name == "hand")
        for row in rows:
            if row.name in ("search", "stack", "auto") and row.cross_fold > hand.cross_fold and row.test < hand.test:
                row.notes += "; overfits: cross-fold above hand, test below"
        lines = [f"| way | in-sample OOF {metric} | cross-fold OOF {metric} | test {metric} | notes |",
                 "|---|---|---|---|---|"]
        lines += [f"| {r.name} | {r.in_sample:.4f} | {r.cross_fold:.4f} | {r.test:.4f} | {r.notes} |" for r in rows]
        header = (f"# Ensembles: {args.set}\n\n`python -m benchmarks.bench_ensembles {args.argv}`\n\n{bench.summary}; "
                  f"runs {', '.join(args.runs)}, hand weights {args.hand}.\n")
        out = Path(args.out) if args.out else work_dir / "results" if args.smoke else DEFAULT_OUT
        out.mkdir(parents=True, exist_ok=True)
        pd.DataFrame([asdict(r) for r in rows]).to_csv(out / f"ensembles_{args.set}.csv", index=False,
                                                       float_format="%.4f")
        (out / f"ensembles_{args.set}.md").write_text(header + "\n" + "\n".join(lines) + "\n")
        print("\n".join(lines))
    return rows


if __name__ == "__main__":
    run_cli(main)
