"""Every study at smoke scale through `python -m studies` (real train.py subprocesses), the report it
writes, resuming, failures, the probe maths, and bad input."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from beton_trainer.common.errors import UserError
from beton_trainer.studies import catalog
from beton_trainer.studies.cli import main
from beton_trainer.studies.landscape import filter_normalized_direction, loss_surface
from beton_trainer.studies.probes import conv_output_size
from beton_trainer.trainer.config import load_recipe


def run_study(name: str, out: Path, *args: str) -> int:
    return main([name, "--out", str(out), "--jobs", "2", *args])


def markdown_rows(report: Path, section: str) -> list[dict[str, str]]:
    """The rows of the markdown table under `## <section>` in report.md."""
    lines = report.read_text().splitlines()
    start = lines.index(f"## {section}") + 2
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split(" | ")])
    header, rows = table[0], table[2:]
    return [dict(zip(header, row)) for row in rows]


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def metrics(run_dir: Path) -> list[dict[str, str]]:
    return csv_rows(run_dir / "metrics.csv")


def check_summary(study_dir: Path, labels: list[str]) -> list[dict[str, str]]:
    """report.md lists exactly these runs; the CSV numbers are sane; every plot the report links exists."""
    report = study_dir / "report.md"
    assert [row["Model"] for row in markdown_rows(report, "Summary")] == labels
    rows = csv_rows(study_dir / "summary.csv")
    assert [row["Model"] for row in rows] == labels
    for row in rows:
        assert 0 <= float(row["Test Acc"]) <= 1
        assert int(row["Params"]) > 0
        assert float(row["Train Time"]) > 0
        assert row["Dataset"] not in ("", "?")
        assert "Status" not in row  # no run failed
    linked = [line[line.index("(") + 1:-1] for line in report.read_text().splitlines()
              if line.startswith("![")]
    assert linked and all((study_dir / p).is_file() and (study_dir / p).stat().st_size > 5000 for p in linked)
    return rows


def by_model(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {row["Model"]: row for row in rows}


# ---------------------------------------------------------------- seed 001


def mlp_params(depth: int, residual: bool, h: int = 256, pixels: int = 784, classes: int = 10) -> int:
    """Parameter count of models/mlp.py's nets, by hand."""
    head = h * classes + classes
    if not residual:
        return pixels * h + h + (depth - 1) * (h * h + h) + head
    block = 2 * h + 2 * (h * h + h)  # LayerNorm + two Linear
    return pixels * h + h + depth * block + 2 * h + head


def test_depth_mlp_smoke(mnist_data, tmp_path):
    assert run_study("depth_mlp", tmp_path, "--data", str(mnist_data)) == 0
    labels = [f"{arch}-d{d}" for arch in ("MLP", "ResidualMLP") for d in (2, 8)]  # smoke: the ends of 2/4/8
    rows = by_model(check_summary(tmp_path / "depth_mlp", labels))
    for d in (2, 8):
        assert int(rows[f"MLP-d{d}"]["Params"]) == mlp_params(d, residual=False)
        assert int(rows[f"ResidualMLP-d{d}"]["Params"]) == mlp_params(d, residual=True)
        assert rows[f"MLP-d{d}"]["Depth"] == str(d) and rows[f"MLP-d{d}"]["Dataset"] == "mnist"
    run = tmp_path / "depth_mlp" / "runs" / "ResidualMLP-d8"
    assert load_recipe(str(run / "config.toml")).model.args["depth"] == 8
    assert len(metrics(run)) == 2  # the smoke twin plus the study's 2 epochs


def test_depth_cnn_smoke(tiny_rgb_data, tmp_path):
    assert run_study("depth_cnn", tmp_path, "--data", str(tiny_rgb_data)) == 0
    labels = [f"{arch}-s{s}" for arch in ("SimpleCNN", "ResidualCNN") for s in (2, 4)]
    rows = by_model(check_summary(tmp_path / "depth_cnn", labels))
    for arch in ("SimpleCNN", "ResidualCNN"):  # the width doubles per stage: a 4th stage adds the most
        assert int(rows[f"{arch}-s4"]["Params"]) > 3 * int(rows[f"{arch}-s2"]["Params"])
    assert int(rows["ResidualCNN-s2"]["Params"]) > int(rows["SimpleCNN-s2"]["Params"])
    for label in labels:
        recipe = load_recipe(str(tmp_path / "depth_cnn" / "runs" / label / "config.toml"))
        assert recipe.model.args["stages"] == int(rows[label]["Stages"])


@pytest.fixture(scope="module")
def distill_study(tiny_rgb_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distill")
    assert run_study("distill", out, "--data", str(tiny_rgb_data)) == 0
    return out


def test_distill_smoke(distill_study):
    """Two seeds at smoke scale: the Summary is mean ± std per run group, paired by seed; Runs lists each."""
    study_dir = distill_study / "distill"
    groups = by_model(check_summary(study_dir, ["teacher", "student", "student-kd-T4"]))
    runs = by_model(csv_rows(study_dir / "runs.csv"))
    assert list(runs) == ["teacher", "student-seed0", "student-seed1", "student-kd-T4-seed0", "student-kd-T4-seed1"]
    assert 450_000 < int(groups["teacher"]["Params"]) < 600_000  # the seed's ~500K teacher
    assert int(groups["student"]["Params"]) == int(groups["student-kd-T4"]["Params"]) < 60_000  # and ~50K student
    assert [groups[g]["Seeds"] for g in groups] == ["1", "2", "2"]
    gains = []
    for seed in (0, 1):  # each distilled student against the baseline of its own seed
        kd, base = runs[f"student-kd-T4-seed{seed}"], runs[f"student-seed{seed}"]
        gains.append(float(kd["Test Acc"]) - float(base["Test Acc"]))
        assert math.isclose(float(kd["Improvement"]), gains[-1], abs_tol=1e-9)
        assert load_recipe(str(study_dir / "runs" / f"student-kd-T4-seed{seed}" / "config.toml")).seed == seed
    kd_group = groups["student-kd-T4"]
    assert math.isclose(float(kd_group["Improvement"]), sum(gains) / 2, abs_tol=1e-9)
    spread = abs(gains[0] - gains[1]) / math.sqrt(2)  # the sample std of two values
    assert math.isclose(float(kd_group["Improvement std"]), spread, abs_tol=1e-9)
    assert kd_group["Outside Spread"] == ("yes" if abs(sum(gains) / 2) > 2 * spread else "no")
    tests = [float(runs[f"student-seed{s}"]["Test Acc"]) for s in (0, 1)]
    assert math.isclose(float(groups["student"]["Test Acc"]), sum(tests) / 2, abs_tol=1e-9)
    assert "Test Acc std" not in groups["teacher"] or groups["teacher"]["Test Acc std"] == ""
    cell = by_model(markdown_rows(study_dir / "report.md", "Summary"))["student"]["Test Acc"]
    assert cell == (f"{sum(tests) / 2:.2%}" if tests[0] == tests[1] else
                    f"{sum(tests) / 2 * 100:.2f} ± {abs(tests[0] - tests[1]) / math.sqrt(2) * 100:.2f}%")
    assert groups["teacher"]["Improvement"] == "" and groups["student"]["Improvement"] == ""
    run = study_dir / "runs" / "student-kd-T4-seed0"
    recipe = load_recipe(str(run / "config.toml"))
    assert recipe.loss.distill.temperature == 4.0
    assert Path(recipe.loss.distill.teacher) == study_dir / "runs" / "teacher"
    assert recipe.loss.distill.teacher_recipe == ""  # the study trained the teacher, not train.py
    alpha = recipe.loss.distill.alpha
    for row in metrics(run):  # the combined loss is the weighted sum of the two logged terms
        hard, soft = float(row["kd_hard_loss"]), float(row["kd_soft_loss"])
        assert hard > 0 and soft >= 0
        assert math.isclose(float(row["train_loss"]), alpha * soft + (1 - alpha) * hard, rel_tol=1e-4)
    assert "kd_soft_loss" not in metrics(study_dir / "runs" / "student-seed0")[0]
    assert (study_dir / "plots" / "dynamics.png").stat().st_size > 5000


def test_rerun_skips_finished_runs(distill_study, tiny_rgb_data, capsys):
    runs = distill_study / "distill" / "runs"
    before = {p.name: (p / "summary.json").stat().st_mtime_ns for p in runs.iterdir()}
    assert run_study("distill", distill_study, "--data", str(tiny_rgb_data)) == 0
    assert capsys.readouterr().out.count("done earlier, skipped") == 5
    assert {p.name: (p / "summary.json").stat().st_mtime_ns for p in runs.iterdir()} == before


def test_report_only_trains_nothing(distill_study, tiny_rgb_data, tmp_path, capsys):
    """--report-only rebuilds a finished study's report as it was, and lists an untrained one's runs."""
    study_dir = distill_study / "distill"
    before = csv_rows(study_dir / "summary.csv")
    assert run_study("distill", distill_study, "--data", str(tiny_rgb_data), "--report-only") == 0
    assert csv_rows(study_dir / "summary.csv") == before and "training" not in capsys.readouterr().out
    assert run_study("distill", tmp_path, "--data", str(tiny_rgb_data), "--report-only") == 1
    rows = by_model(markdown_rows(tmp_path / "distill" / "report.md", "Summary"))
    assert rows["student"]["Status"] == "2 of 2 seeds failed: not trained yet (--report-only)"
    assert not (tmp_path / "distill" / "runs").exists()


def test_cpu_scale_plan(mnist_data, tiny_rgb_data, tmp_path):
    """The cpu scale's runs: every seed of every run, valid overrides (the plan loads each recipe), a
    single teacher, and each distilled student paired with the baseline of its seed."""
    from beton_trainer.studies.runner import plan

    sizes = {}
    for name, data in (("depth_mlp", mnist_data), ("depth_cnn", tiny_rgb_data), ("distill", tiny_rgb_data)):
        runs = catalog.study_runs(catalog.STUDIES[name], "cpu")
        jobs = plan(runs, tmp_path / name, data)
        sizes[name] = len(jobs)
        assert all(load_recipe(j.run.recipe, j.overrides).seed == j.run.facts.get("Seed", 0) for j in jobs)
    assert sizes == {"depth_mlp": 4 * 2 * 3, "depth_cnn": 3 * 2 * 2, "distill": 1 + 7 * 3}
    mlp = catalog.study_runs(catalog.STUDIES["depth_mlp"], "cpu")
    assert sorted({r.facts["Depth"] for r in mlp}) == [2, 4, 8, 16]
    recipe = load_recipe(mlp[0].recipe, mlp[0].overrides)
    assert recipe.data.val_split == "val" and recipe.phases[0].early_stopping.metric == "val_loss"
    distill = {r.label: r for r in catalog.study_runs(catalog.STUDIES["distill"], "cpu")}
    assert [label for label in distill if "seed" not in label] == ["teacher"]
    assert {(r.facts["T"], r.facts["alpha"]) for r in distill.values() if r.teacher} == {
        (1.0, 0.7), (2.0, 0.7), (4.0, 0.7), (8.0, 0.7), (4.0, 0.3), (4.0, 0.9)}
    for run in distill.values():
        if run.compare_to:
            assert run.compare_to == f"student-seed{run.facts['Seed']}"


def test_group_rows_mean_std_and_failures():
    from beton_trainer.studies.results import group_rows

    def row(label, group, acc, status="ok", gain=None):
        return {"Model": label, "Group": group, "Seed": 0, "Test Acc": acc, "Params": 10, "Improvement": gain,
                "Status": status}

    rows = [row("a-seed0", "a", 0.5, gain=0.02), row("a-seed1", "a", 0.7, gain=0.04),
            row("a-seed2", "a", float("nan"), "failed: x"), row("b", "b", 0.9)]
    a, b = group_rows(rows)
    assert a["Model"] == "a" and a["Seeds"] == 3 and a["Params"] == 10 and "Seed" not in a
    assert math.isclose(a["Test Acc"], 0.6) and math.isclose(a["Test Acc std"], math.sqrt(0.02))
    assert math.isclose(a["Improvement"], 0.03) and a["Outside Spread"] == "yes"  # 0.03 > 2 * 0.0141
    assert a["Status"] == "1 of 3 seeds failed: x"
    assert b["Test Acc"] == 0.9 and "Test Acc std" not in b and b["Status"] == "ok" and "Outside Spread" not in b


# ---------------------------------------------------------------- seed 003


def lr_column(run_dir: Path) -> list[float]:
    return [float(row["lr_base"]) for row in metrics(run_dir)]


def test_lr_sweep_smoke(tiny_rgb_data, tmp_path):
    assert run_study("lr_sweep", tmp_path, "--data", str(tiny_rgb_data)) == 0
    rows = by_model(check_summary(tmp_path / "lr_sweep", ["lr0.1", "lr0.001"]))  # smoke: the ends of 4 rates
    runs = tmp_path / "lr_sweep" / "runs"
    reference = lr_column(runs / "lr0.1")
    for label, row in rows.items():
        lr = float(row["LR"])
        assert load_recipe(str(runs / label / "config.toml")).phases[0].optimizer.lr == lr
        curve = lr_column(runs / label)  # the same OneCycle shape, scaled by max_lr
        assert all(math.isclose(v, r * lr / 0.1, rel_tol=1e-6) for v, r in zip(curve, reference))
        assert max(curve) <= lr


def test_grid_smoke(tiny_rgb_data, tmp_path):
    assert run_study("grid", tmp_path, "--data", str(tiny_rgb_data)) == 0
    labels = [f"bs{bs}-wd0.0001-clip{c:g}" for c in (0, 0.1) for bs in (16, 32)]
    rows = check_summary(tmp_path / "grid", labels)
    for row in rows:
        recipe = load_recipe(str(tmp_path / "grid" / "runs" / row["Model"] / "config.toml"))
        assert recipe.data.batch_size == int(row["Batch Size"])
        assert recipe.phases[0].optimizer.weight_decay == float(row["Weight Decay"])
        assert recipe.grad_clip_value == float(row["Grad Clip"])


def test_aug_ablation_smoke(tiny_rgb_data, tmp_path):
    assert run_study("aug_ablation", tmp_path, "--data", str(tiny_rgb_data)) == 0
    stages = load_recipe("c100_scratch_smoke").augment.enabled()
    assert stages == ["crop", "flip", "jitter", "mix"]
    rows = check_summary(tmp_path / "aug_ablation", ["all", *(f"no-{s}" for s in stages)])
    for row in rows:
        augment = load_recipe(str(tmp_path / "aug_ablation" / "runs" / row["Model"] / "config.toml")).augment
        assert augment.enabled() == [s for s in stages if s != row["Removed"]]
        assert math.isclose(float(row["Gap"]), float(row["Train Acc"]) - float(row["Test Acc"]), abs_tol=1e-9)
        assert 0 <= float(row["Train Acc"]) <= 1


def test_optimizers_smoke(tiny_rgb_data, tmp_path):
    assert run_study("optimizers", tmp_path, "--data", str(tiny_rgb_data)) == 0
    rows = check_summary(tmp_path / "optimizers", ["SGD", "Adam", "RMSprop"])
    for row in rows:
        recipe = load_recipe(str(tmp_path / "optimizers" / "runs" / row["Model"] / "config.toml"))
        opt = recipe.phases[0].optimizer
        assert (opt.name, opt.lr) == (row["Model"].lower(), float(row["LR"]))


def non_increasing(values: list[float]) -> bool:
    return all(b <= a * (1 + 1e-9) for a, b in zip(values, values[1:]))


def test_schedules_smoke(tiny_rgb_data, tmp_path):
    assert run_study("schedules", tmp_path, "--data", str(tiny_rgb_data)) == 0
    check_summary(tmp_path / "schedules", ["onecycle", "step", "cosine", "warm_restarts"])
    runs = tmp_path / "schedules" / "runs"
    cosine, step = lr_column(runs / "cosine"), lr_column(runs / "step")
    restarts, onecycle = lr_column(runs / "warm_restarts"), lr_column(runs / "onecycle")
    assert len(cosine) == 4 and non_increasing(cosine) and cosine[-1] < cosine[0]
    assert non_increasing(step) and step[0] / step[-1] == pytest.approx(10)  # 4 epochs at step_size 2: one decay
    assert not non_increasing(restarts) and max(restarts) == pytest.approx(0.01)  # it jumps back to the top
    peak = onecycle.index(max(onecycle))
    assert non_increasing(onecycle[peak:]) and onecycle[-1] < 1e-5  # OneCycle anneals to ~max_lr / 25e4


# ---------------------------------------------------------------- probes


@pytest.fixture(scope="module")
def probed_run(tiny_rgb_data, tmp_path_factory) -> Path:
    """The filters study trains the one small CNN the other probe studies reuse through --run."""
    out = tmp_path_factory.mktemp("probes")
    assert run_study("filters", out, "--data", str(tiny_rgb_data)) == 0
    return out / "filters"


def test_filters_smoke(probed_run):
    check_summary(probed_run, ["model"])
    rows = markdown_rows(probed_run / "report.md", "First-layer filters")
    assert [int(r["Filter"]) for r in rows] == list(range(16))  # width 16: the smoke model's first layer
    for row in csv_rows(probed_run / "first_layer_filters.csv"):
        assert float(row["Weight Norm"]) > 0 and float(row["Mean Abs Response"]) > 0
        assert 0 <= float(row["Active Fraction"]) <= 1


def test_stride_padding_shapes_follow_the_formula(probed_run, tmp_path):
    assert run_study("stride_padding", tmp_path, "--run", str(probed_run / "runs" / "model")) == 0
    rows = csv_rows(tmp_path / "stride_padding" / "output_shapes_measured_vs_floor_n_2p_k_s_1.csv")
    expected = [(s, p) for s in (1, 2, 3) for p in (0, 1, 2)]
    assert [(int(r["Stride"]), int(r["Padding"])) for r in rows] == expected
    for row in rows:
        n, k, s, p = 32, int(row["Kernel"]), int(row["Stride"]), int(row["Padding"])
        side = (n + 2 * p - k) // s + 1
        assert row["Input"] == "32x32" and row["Output"] == f"{side}x{side}" == row["Formula"]
    assert conv_output_size(32, 3, 2, 1) == 16 and conv_output_size(28, 5, 3, 0) == 8


def test_loss_landscape_smoke(probed_run, tmp_path):
    assert run_study("loss_landscape", tmp_path, "--run", str(probed_run / "runs" / "model")) == 0
    study_dir = tmp_path / "loss_landscape"
    summary = by_model(csv_rows(study_dir / "loss_landscape_on_256_fixed_training_images.csv"))
    assert set(summary) == {"trained", "untrained"}
    line = csv_rows(study_dir / "1_d_slice_loss_at_theta_a_d.csv")
    assert [float(r["Alpha"]) for r in line] == pytest.approx([i / 5 - 1 for i in range(11)])
    for name, row in summary.items():
        center = float(line[5][f"{name} Loss"])  # a = 0 is the unperturbed model
        assert math.isclose(center, float(row["Center Loss"]), rel_tol=1e-5)
        assert float(row["1-D Min Loss"]) <= center <= float(row["1-D Max Loss"])
        assert 0 <= float(row["Center Acc"]) <= 1
    assert (study_dir / "plots" / "landscape_2d.png").is_file()


def test_directions_are_filter_normalized_and_weights_restored():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    direction = filter_normalized_direction(model, torch.Generator().manual_seed(0))
    for p, d in zip(model.parameters(), direction):
        if p.dim() == 1:
            assert not d.any()  # biases and BatchNorm are not perturbed
        else:
            assert torch.allclose(d.flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1), rtol=1e-5)
    images, labels = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    before = [p.detach().clone() for p in model.parameters()]
    (center, _), (moved, _) = loss_surface(model, [direction], [(0.0,), (1.0,)], images, labels)
    assert center != moved
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ---------------------------------------------------------------- failures and bad input


def test_failed_run_is_reported_and_its_students_skipped(tiny_rgb_data, tmp_path, monkeypatch, capsys):
    """A run train.py rejects at start-up (7 stages cannot fit 32x32) is a failed row, not a crash; the run
    distilling from it is not started; the report is still written and the exit status is 1."""
    def runs(scale):
        return [catalog.Run("broken", "c10_rescnn", ("model.args.stages=7",), {"Role": "teacher"}),
                catalog.Run("kd", "c10_kd", (), {"Role": "student"}, teacher="broken")]

    study = catalog.Study("broken", "A study with a failing teacher", "test", runs, {"smoke": ()})
    monkeypatch.setitem(catalog.STUDIES, "broken", study)
    assert run_study("broken", tmp_path, "--data", str(tiny_rgb_data)) == 1
    rows = by_model(markdown_rows(tmp_path / "broken" / "report.md", "Summary"))
    assert "stages" in rows["broken"]["Status"] and rows["broken"]["Test Acc"] == "-"
    assert "teacher run 'broken' failed" in rows["kd"]["Status"]
    assert not (tmp_path / "broken" / "runs" / "kd").exists()
    assert "2 of 2 runs failed" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["depth_mpl"], "did you mean 'depth_mlp'"),
    (["lr_sweep", "--scale", "medium"], "no medium scale"),
    (["depth_mlp", "--run", "."], "--run only applies to the probe studies"),
    (["filters", "--run", "."], "is not a finished training run"),
    (["depth_mlp", "--data", "/nonexistent"], "manifest.json is missing"),
    (["depth_mlp", "--jobs", "0"], "--jobs must be at least 1"),
])
def test_bad_input_is_one_user_error(argv, message, tmp_path):
    with pytest.raises(UserError, match=message.replace("'", ".")):
        main([*argv, "--out", str(tmp_path)])


def test_finished_run_with_other_settings_is_not_reused(probed_run):
    with pytest.raises(UserError, match="holds a finished run with other settings"):
        main(["filters", "--scale", "full", "--out", str(probed_run.parent)])
