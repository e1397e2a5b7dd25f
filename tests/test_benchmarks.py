"""Every benchmark script end to end in its ``--smoke`` mode (tiny sizes, CPU, seconds), called in-process.

The benchmarks drive the real Trainer, losses, threshold search and label embedding; when the code under
them changes, a benchmark that no longer runs fails here instead of on the day someone reruns it. The
figures a smoke run prints measure nothing: these tests check that the script gets through and prints its
table, and that a verdict it prints follows from its figure and target, not what the figures are.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from threadpoolctl import threadpool_limits

from benchmarks import (
    bench_gpu_memory,
    bench_label_embedding,
    bench_learning,
    bench_thresholds,
    bench_train_step,
    study_label_embedding,
)

pytestmark = pytest.mark.slow

NUMBER = r"-?\d+\.\d+"


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    # As for torch (conftest): BLAS threads that spin-wait on a small shared box make tiny matrices far slower.
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(autouse=True)
def _nothing_written_here(tmp_path, monkeypatch):
    """Run each benchmark from an empty folder and check it stays empty: a smoke run writes only to its
    own temp folder (or the ``--out`` it is given)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield
    assert not list(cwd.iterdir()), f"the benchmark wrote into the working directory: {list(cwd.iterdir())}"


def has_line(output: str, pattern: str) -> bool:
    return re.search(pattern, output, flags=re.MULTILINE) is not None


def test_bench_train_step(capsys):
    # --threads 0: keep the test session's thread settings (conftest: one torch thread).
    bench_train_step.main(["--smoke", "--threads", "0"])
    out = capsys.readouterr().out
    assert has_line(out, r"^images/s, wall clock\s+median\s+min\.\.max\s+vs timm-style\s+paired ratio$")
    for variant in ("pipeline loop", "timm-style", "loop - tracker.log", "loop - tqdm", "loop - EMA", "loop - clip",
                    "loop - all four", "timm-style \\+ float\\(loss\\)"):
        assert has_line(out, rf"^{variant}\s+{NUMBER}\s+{NUMBER}\.\.{NUMBER}\s+{NUMBER}\s+{NUMBER}$"), variant
    assert has_line(out, rf"^wall clock: pipeline loop {NUMBER} images/s, timm-style {NUMBER} images/s; "
                         rf"ratio {NUMBER} \(median of paired rounds\)")
    assert has_line(out, rf"^checkpoint  last\.pt every \d+ optimizer steps .*: {NUMBER} s per save")
    for extra in ("scheduler.step()", "tracker.log (W&B disabled)", "clip_grad_norm_", "EMA update", "sum"):
        assert has_line(out, rf"^  {re.escape(extra)}.*\s{NUMBER} ms\s+{NUMBER}%$"), extra


def test_bench_gpu_memory(capsys):
    # --backbone only names the model whose timm checkpointing support is reported (nasnetalarge by default,
    # 1-2 s to build); the smoke layouts always run test_resnet.
    bench_gpu_memory.main(["--smoke", "--backbone", "test_resnet"])
    out = capsys.readouterr().out
    for layout in ("NCHW", "grad_ckpt (timm)", "cell_ckpt (bench only)", "channels_last", "cell_ckpt+ch_last"):
        assert has_line(out, rf"\] {re.escape(layout)}\s+2\s+{NUMBER}\s+\(cpu: no GPU memory\)$"), layout
    assert has_line(out, r"test_resnet: timm set_grad_checkpointing supported: yes$")
    assert has_line(out, r"\] smoke check passed$")


def test_bench_thresholds(capsys):
    bench_thresholds.main(["--smoke"])
    out = capsys.readouterr().out
    assert has_line(out, r"^OOF matrix  2000 x 8, ")
    assert has_line(out, rf"^brute force \(sklearn f1_score, 5 thr/class\)\s+{NUMBER}\s+{NUMBER}\s+1\.0$")
    assert has_line(out, rf"^best_thresholds \(exact, vectorised\)\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}$")
    assert has_line(out, rf"^compare_strategies \(\d+ strategies x 5 folds\)\s+{NUMBER}")
    assert "WARNING" not in out  # the exact search never scores below the grid
    assert has_line(out, rf"^  oof_f1\s+in-sample macro-F1 {NUMBER}, cross-fold {NUMBER}$")
    assert has_line(out, rf"^best_thresholds\s+{NUMBER}\s+{NUMBER}$")  # the large size
    assert has_line(out, rf"^global_bounded: metric_curve, one binning pass\s+{NUMBER}\s+{NUMBER}$")  # decisions
    assert has_line(out, rf"^top_k: top_k_curve, one partial sort\s+{NUMBER}\s+{NUMBER}$")
    assert has_line(out, rf"^  top_k\s+in-sample F2 {NUMBER}, cross-fold {NUMBER}, {NUMBER} labels per image "
                         r"\(top \d+\)$")
    assert has_line(out, rf"^  5000 x 50: {NUMBER} s, {NUMBER} ns per entry")


def test_bench_learning(capsys):
    bench_learning.main(["--smoke", "--threads", "0"])
    out = capsys.readouterr().out
    assert has_line(out, r"^predictor\s+@0\.5\s+tuned\s+cross-tuned$")
    for predictor in (r"pipeline \(test_resnet, best epoch 1\)", r"pixel logistic regression \(8 px\)",
                      r"constant \(train label rates\)"):
        assert has_line(out, rf"^{predictor}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}$"), predictor
    assert has_line(out, rf"^pipeline - pixel logistic regression \(cross-tuned macro-F1\): \+?{NUMBER} -> ")


def test_bench_label_embedding(capsys):
    bench_label_embedding.main(["--smoke"])
    out = capsys.readouterr().out
    assert has_line(out, r"^5,000 images x 300 labels, dim 16")
    for stage in ("label matrix", "PMI (positive)", "embedding k=16", "decode 1,000 x 300", "decode_top_k(10) 1,000"):
        assert has_line(out, rf"^{re.escape(stage)}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}$"), stage
    # Each check's verdict follows from its figure and target; at smoke sizes the timings are far inside theirs
    # (the peak RSS is this whole test process's, so it may be either).
    for check, smoke_verdict in (("PMI + embedding time", "PASS"), ("PMI + embedding peak RSS", None),
                                 ("decode 1,000 x 300 time", "PASS")):
        found = re.search(rf"^{re.escape(check)}\s+({NUMBER}) (\S+)\s+< (\d+(?:\.\d+)?) \2\s+(PASS|MISS)$", out,
                          re.MULTILINE)
        assert found, check
        figure, _, target, verdict = found.groups()
        assert verdict == ("PASS" if float(figure) < float(target) else "MISS"), found.group(0)
        assert smoke_verdict in (None, verdict), found.group(0)
    assert has_line(out, r"^decode quality \(info\): \d+\.\d% of the labels")


def test_study_label_embedding(capsys, tmp_path, monkeypatch):
    default_out = tmp_path / "default_out"
    monkeypatch.setattr(study_label_embedding, "DEFAULT_OUT", default_out)
    out_dir = tmp_path / "out"
    study_label_embedding.main(["--smoke", "--out", str(out_dir)])
    out = capsys.readouterr().out
    for method in ("bce", "label_embedding"):
        assert has_line(out, rf"^\s*{method}\s+1(\s+{NUMBER}){{7}}$"), method
    assert {p.name for p in out_dir.iterdir()} == {"history.csv", "study.md", "study.png"}
    study = (out_dir / "study.md").read_text()
    assert "## Final epoch" in study and "| P@3 |" in study and "--smoke" in study

    study_label_embedding.main(["--smoke"])  # without --out: into the temp folder, not the results folder
    assert has_line(capsys.readouterr().out, rf"wrote {re.escape(tempfile.gettempdir())}/\S+/results/history\.csv")
    assert not default_out.exists()


def test_bench_recipes(capsys, tmp_path):
    from benchmarks import bench_recipes  # appended last, after the import block others edit

    out_dir = tmp_path / "out"
    # fastai (row f) is a benchmark-only requirement: not installed by requirements.txt
    bench_recipes.main(["--smoke", "--threads", "0", "--rows", "abocde", "--out", str(out_dir)])
    out = capsys.readouterr().out
    assert has_line(out, r"^predictor\s+OOF macro-F1\s+test macro-F1\s+train min\s+notes$")
    for predictor in (r"\(a\) main config, data keys only", r"\(b\) small-data recipe",
                      r"\(o\) small-data recipe, round three", r"\(c\) pixel logistic regression \(8 px\)",
                      r"\(d\) plain timm loop \(test_resnet, same seconds as b\)",
                      r"\(e\) constant prior \(train label rates\)"):
        assert has_line(out, rf"^{predictor}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+\S"), predictor
    assert has_line(out, r"^\(e\) constant prior .*degenerate: refused without --force$")
    assert has_line(out, rf"^\(b\) small-data recipe vs \(d\) plain timm loop .*: test macro-F1 {NUMBER} vs "
                         rf"{NUMBER} \(difference [+-]{NUMBER}, ratio {NUMBER}\)")
    assert {p.name for p in out_dir.iterdir()} == {"recipes_hpa.csv", "recipes_hpa.md"}
    assert "| (b) small-data recipe |" in (out_dir / "recipes_hpa.md").read_text()


def test_bench_recipes_on_the_handwriting_set_in_the_csv_layout(capsys, tmp_path):
    from benchmarks import bench_recipes

    bench_recipes.main(["--smoke", "--threads", "0", "--set", "digits", "--rows", "be", "--out", str(tmp_path)])
    table = pd.read_csv(tmp_path / "recipes_digits.csv")
    assert table["name"].tolist() == ["(b) small-data recipe", "(e) constant prior (train label rates)"]
    assert table["test_metric"].between(0, 1).all()
    with pytest.raises(SystemExit):
        bench_recipes.main(["--smoke", "--rows", "bz"])
    with pytest.raises(SystemExit):  # the many-label recipe is not written for a few-label layout
        bench_recipes.main(["--smoke", "--rows", "m"])


def test_bench_recipes_on_the_many_label_set_scores_per_image_f2_against_the_best_constant(capsys, tmp_path):
    from benchmarks import bench_recipes
    from benchmarks.recipe_sets import best_constant, per_image_f2

    bench_recipes.main(["--smoke", "--threads", "0", "--set", "digits_many", "--out", str(tmp_path)])
    table = pd.read_csv(tmp_path / "recipes_digits_many.csv")
    assert table["name"].tolist() == ["(m) many-label recipe", "(n) many-label recipe, round three",
                                      "(k) best constant submission"]
    assert table["test_metric"].between(0, 1).all()
    assert "test per-image F2" in capsys.readouterr().out
    # The best constant grows from the commonest label while F2 rises: {0, 1} scores (5 + 4 x 0.833) / 10 = 0.833;
    # adding the rare label 2 gives (5 x 0.909 + 5 x 0.714) / 10 = 0.812, so it stops there.
    y = np.array([[1, 1, 0]] * 5 + [[1, 0, 0]] * 4 + [[0, 0, 1]])
    assert best_constant(y, per_image_f2).tolist() == [1, 1, 0]


def test_bench_loader(capsys):
    from benchmarks import bench_loader

    bench_loader.main(["--smoke"])
    out = capsys.readouterr().out
    for path in ("naive PNG decode \\(PIL\\), baseline", "dataset, packed cache, training policy",
                 "dataset, packed cache, albumentations chain \\(before\\)",
                 "dataset, packed cache, device-side policy: loader part"):
        assert has_line(out, rf"^{path}\s+{NUMBER}\s+{NUMBER}$"), path
    assert has_line(out, rf"^device-side policy on the batch \((cpu|cuda), batch 4\)\s+{NUMBER}\s+-$")
    assert has_line(out, rf"^training policy vs the albumentations chain it replaced: {NUMBER}x$")
    assert has_line(out, rf"^packed cache \+ training policy: {NUMBER}x the naive loader")
    assert has_line(out, rf"^packed cache \+ device-side policy \(loader part\): {NUMBER}x the naive loader")


def test_bench_folds(capsys):
    from benchmarks import bench_folds

    bench_folds.main(["--smoke"])
    out = capsys.readouterr().out
    assert has_line(out, r"^method\s+n\s+m\s+seconds\s+RSS before GiB\s+peak RSS GiB\s+LD\s+ED\s+max dev\s+mean dev"
                         r"\s+empty$")
    balance = rf"\s+{NUMBER}e[+-]\d+(\s+{NUMBER}){{3}}\s+\d+$"  # LD, ED, max dev, mean dev, empty pairs
    for method in (r"random KFold \(baseline\)", r"iterstrat \(folds\.method=iterstrat\)",
                   r"fast \(folds\.method=fast\)"):
        assert has_line(out, rf"^{method}\s+2,000\s+50(\s+{NUMBER}){{3}}{balance}"), method
    for row in (r"label_csr \(label tuples -> csr\)", r"read labels csv \(openimages format\)"):
        assert has_line(out, rf"^{row}\s+2,000\s+50(\s+{NUMBER}){{3}}(\s+-){{5}}$"), row
    assert has_line(out, rf"^fast vs iterstrat at 2,000 x 50 \(same table, same run\): {NUMBER} s vs {NUMBER} s "
                         rf"\(ratio {NUMBER}x\); LD ")


def test_bench_gpu(capsys):
    from benchmarks import bench_gpu

    bench_gpu.main(["--smoke"])
    out = capsys.readouterr().out
    assert has_line(out, r"^model\s+prec\s+mode\s+ckpt\s+batch\s+pipeline img/s\s+bare img/s\s+ratio\s+peak GiB")
    # bf16 on a CPU without bf16 kernels runs (and is reported) as fp32; no GPU memory figures on a CPU
    for model, ckpt in (("test_resnet", "off"), ("test_resnet", "on"), ("test_efficientnet", "off")):
        cell = rf"^{model}\s+(bf16|fp32)\s+eager\s+{ckpt}\s+2\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+-\s+-$"
        assert has_line(out, cell), (model, ckpt)
    for loader in ("cache \\+ CPU policy, per core", "cache, device policy: reads, per core",
                   "device policy on cpu, batch 2"):
        assert has_line(out, rf"^loader: {loader}\s+{NUMBER}$"), loader
    assert has_line(out, rf"^goal pipeline within 1\.2x of bare timm: lowest ratio {NUMBER} \(.*\): (met|not met)$")
    assert has_line(out, rf"^goal loader feeds test_efficientnet \({NUMBER} img/s\) on 4 cores with .*: {NUMBER} "
                         r"cores needed: (met|not met)$")


def test_many_labels(capsys, tmp_path):
    from benchmarks import many_labels

    result = many_labels.main(["--smoke", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert has_line(out, r"^\| loss \| P@1 \| P@3 \| F2 \| macro-F1 \| OOF \(chosen, cross-fold\) \| minutes \|")
    for loss in ("bce", "label_embedding"):
        assert has_line(out, rf"^\| {loss} \| {NUMBER} \| {NUMBER} \| {NUMBER} \| {NUMBER} \| {NUMBER} \|"), loss
    assert list(result["loss"]) == ["bce", "label_embedding"] and (tmp_path / "out" / "many_labels.md").is_file()


def test_bench_scale(capsys):
    from benchmarks import bench_scale

    rows = bench_scale.main(["--smoke", "--threads", "0"])
    out = capsys.readouterr().out
    assert has_line(out, r"^8,000 training images x 1,500 labels, 800 test images, 8 px; ")
    assert has_line(out, r"^stage\s+seconds\s+RSS before GiB\s+peak RSS GiB\s+notes$")
    for stage in ("labels csv", "packed cache", "folds", "train: build_parts", "validation \\+ OOF table",
                  "predict \\(inference", "decision search alone"):
        assert has_line(out, rf"^{stage}.*\s{NUMBER}\s+{NUMBER}\s+{NUMBER}"), stage
    assert has_line(out, rf"^largest stage peak: {NUMBER} GiB \(\S+\) < 7\.45 GiB \(8 GB\): (PASS|MISS)$")
    # Past CSV_MAX_CLASSES: validation wrote its OOF scores as a float16 table, predict read it in row blocks.
    assert [row["stage"] for row in rows] == ["labels", "pack", "folds", "train", "validation", "predict",
                                              "decision search"]
    assert "800 test rows" in rows[5]["note"]


def test_bench_switches_trains_every_fold_of_each_row_and_compares_it_with_base(capsys, tmp_path, monkeypatch):
    from benchmarks import bench_switches
    from src import report

    def no_plot(*args, **kwargs) -> Path:
        path = next(a for a in args if isinstance(a, Path))
        path.touch()
        return path

    # The report's plots (src.report's tests draw them) would take most of this test's time: empty files instead.
    for plot in ("plot_strategies", "plot_per_class_f1", "plot_f1_vs_threshold", "plot_label_rates"):
        monkeypatch.setattr(report, plot, no_plot)
    # In this process (a child process per row would spend seconds importing torch); the isolation is below.
    rows = bench_switches.main(["--smoke", "--threads", "0", "--no-isolate", "--rows", "base,rare",
                                "--out", str(tmp_path), "--work-dir", str(tmp_path / "work")])
    out = capsys.readouterr().out
    assert has_line(out, r"^\| row \| OOF macro-F1 cross-fold \| test macro-F1 \| OOF vs base \| test vs base \| "
                         r"s/epoch \| peak MiB \| notes \|$")
    assert has_line(out, rf"^\| base: small-data recipe as shipped \| {NUMBER} \| {NUMBER} \| \+0\.0000 \| \+0\.0000 "
                         rf"\| {NUMBER} \| \d+ \| OOF \w+; best epochs \d/\d of 1")
    assert has_line(out, rf"^\| rare: .* \| {NUMBER} \| {NUMBER} \| [+-]{NUMBER} \| [+-]{NUMBER} \| {NUMBER} \| \d+ \| "
                         r"`train.sampler=rare train.sampler_power=0.5`")
    table = pd.read_csv(tmp_path / "switches_hpa.csv")
    assert table["key"].tolist() == ["base", "rare"] and table["test_metric"].between(0, 1).all()
    assert table["test_vs_base"].iloc[1] == pytest.approx(table["test_metric"].iloc[1] - table["test_metric"].iloc[0],
                                                          abs=1e-3)
    assert (table["peak_mib"] > 0).all() and rows[0].seconds_per_epoch > 0
    assert (tmp_path / "switches_hpa.md").read_text().startswith("# Switches on real images: hpa")
    # --add: a row measured later joins the table beside the earlier base, in switch order; other settings refused.
    common = ["--smoke", "--threads", "0", "--no-isolate", "--out", str(tmp_path), "--work-dir", str(tmp_path / "w2")]
    bench_switches.main([*common, "--add", "--rows", "extra"])
    added = pd.read_csv(tmp_path / "switches_hpa.csv")
    assert added["key"].tolist() == ["base", "rare", "extra"]
    kept = ["key", "oof_metric", "test_metric", "overrides", "notes"]
    assert added[kept].iloc[:2].equals(table[kept])  # the earlier rows as they were
    assert added["test_vs_base"].iloc[2] == pytest.approx(added["test_metric"].iloc[2] - added["test_metric"].iloc[0],
                                                          abs=1e-3)
    header = (tmp_path / "switches_hpa.md").read_text()
    assert "--rows base,rare" in header and "--add --rows extra" in header
    # The extra row trained on the train-only source in every fold; its OOF holds the competition's rows only.
    extra_run = tmp_path / "w2" / "runs" / "extra"
    assert all(pd.read_csv(extra_run / f"fold{k}" / "oof.csv")["Id"].str.startswith("train").all() for k in (0, 1))
    with pytest.raises(SystemExit, match="other settings"):
        bench_switches.main([*common, "--add", "--rows", "mixup", "--data-seed", "1"])
    with pytest.raises(SystemExit, match="unknown row"):
        bench_switches.parse_rows("base,nope", smoke=False)
    assert [s.key for s in bench_switches.parse_rows("xb", smoke=False)] == ["base", "crops"]

    # The ensembles of those two runs (benchmarks.bench_ensembles): every way, auto's test = the way it picked.
    from benchmarks import bench_ensembles
    ways = bench_ensembles.main(["--smoke", "--threads", "0", "--runs", "base,rare", "--work-dir",
                                 str(tmp_path / "work"), "--out", str(tmp_path)])
    assert [w.name for w in ways] == ["run base", "run rare", "hand", "equal", "search", "stack", "auto"]
    by_name = {w.name: w for w in ways}
    picked = by_name["auto"].notes.split()[2]
    assert by_name["auto"].cross_fold == by_name[picked].cross_fold
    assert by_name["auto"].cross_fold == max(by_name[w].cross_fold for w in ("hand", "equal", "search", "stack"))
    assert (tmp_path / "ensembles_hpa.md").is_file()


def test_bench_switches_reads_each_child_process_peak_on_its_own():
    import sys

    from benchmarks.bench_switches import run_isolated

    def child(mib: int) -> list[str]:
        return [sys.executable, "-c", f"b = bytearray({mib} * 2**20); b[::4096] = b'x' * len(b[::4096])"]

    status, big = run_isolated(child(200))
    # getrusage(RUSAGE_CHILDREN) would report the larger, earlier child's peak for the small one too.
    _, small = run_isolated(child(20))
    assert status == 0 and big > 200 > small
    assert run_isolated([sys.executable, "-c", "raise SystemExit(3)"])[0] == 3
