"""Every study as data: its runs (label -> recipe + `--set` overrides + table facts), scales and plots.

Smoke scale uses each recipe's `*_smoke` twin (a few steps on the CPU) and keeps only the ends of each
sweep (depths 2 and 8, two learning rates, one temperature): every code path at the least cost. Full
scale is the recipe itself (the seeds' epochs); a study's `scales` adds the overrides every one of its
runs gets at that scale.
CPU scale (seed 001's studies only) is sized to answer their questions on a 2-core CPU in about two
hours: each run is repeated over `seeds[scale]` seeds (labels `<run>-seed<k>`, `--set seed=k`) so the
report can give mean ± std; a run marked `seeded=False` (the distillation teacher) is trained once.
Seed-003 studies follow the `c100_scratch` recipe (ResNet34, Adam + OneCycle, MixUp/CutMix); at smoke
scale they swap in a small CNN so they finish in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from beton_trainer.common.errors import UserError, did_you_mean
from beton_trainer.trainer.config import load_recipe

__all__ = ["Plot", "Run", "SCALES", "STUDIES", "Study", "get_study", "study_run_dir", "study_runs"]

SCALES = ("smoke", "medium", "cpu", "full")


@dataclass
class Run:
    """One train.py run of a study."""

    label: str  # the run folder's name and the table's Model column
    recipe: str  # base recipe; at smoke scale its `_smoke` twin
    overrides: tuple[str, ...] = ()
    facts: dict[str, Any] = field(default_factory=dict)  # study-specific table columns (Depth, LR, ...)
    teacher: str = ""  # label of the run (of this study) that distils into this one
    compare_to: str = ""  # label of the run this one's Improvement column is measured against
    seeded: bool = True  # repeated per seed when the scale has several (False: trained once, e.g. a teacher)
    group: str = ""  # the run's label before its seed suffix: the report's mean ± std rows group by it


@dataclass(frozen=True)
class Plot:
    """One PNG of the report, drawn from the summary table rows and the runs' metrics.csv.

    kinds: curves (loss and accuracy per epoch, a row of panels per `panel` value), bars (`y` per `x`,
    a bar per `hue`), scatter / lines (`y` against `x`, a series per `hue`), heatmap (`y` over `x` by
    `hue`, a panel per `panel` value), lr (lr_* columns per epoch), kd_losses (hard, soft, combined),
    dynamics (lr and gradient norm per epoch, epochs run and best epoch, peak memory, per run).
    Tables' plots (bars, scatter, lines, heatmap) draw one point per run group (mean, ± std bars); the
    per-epoch ones draw each group's first seed.
    """

    kind: Literal["curves", "bars", "scatter", "lines", "heatmap", "lr", "kd_losses", "dynamics"]
    file: str
    title: str
    x: str = ""
    y: str = "Test Acc"
    hue: str = ""
    panel: str = ""
    reference: str = ""  # lines: a run label drawn as a horizontal line (e.g. the baseline)


@dataclass(frozen=True)
class Study:
    name: str
    title: str
    source: str  # which seed experiment it reproduces
    runs: Callable[[str], list[Run]]  # scale -> runs
    scales: dict[str, tuple[str, ...]]  # scale -> overrides for every run
    plots: tuple[Plot, ...] = ()
    extra: tuple[str, ...] = ()  # derived columns shown in the table (Train Acc, Gap, Best Test Acc, ...)
    probe: str = ""  # probe studies: filters | stride_padding | loss_landscape (measure the trained run)
    note: str = ""
    seeds: dict[str, int] = field(default_factory=dict)  # scale -> seeds per run (default 1)


def recipe_for(recipe: str, scale: str) -> str:
    return f"{recipe}_smoke" if scale == "smoke" else recipe


# ---------------------------------------------------------------- seed 001: depth and distillation

MNIST_ARCHS = (("MLP", "mnist_mlp"), ("ResidualMLP", "mnist_resmlp"))
CIFAR_ARCHS = (("SimpleCNN", "c10_cnn"), ("ResidualCNN", "c10_rescnn"))


def _depth_runs(archs: tuple[tuple[str, str], ...], key: str, column: str, values: tuple[int, ...],
                extra: dict[str, tuple[int, ...]] | None = None):
    """Runs per arch and depth: the ends of `values` at smoke scale, `extra[scale]` added at that scale."""
    def runs(scale: str) -> list[Run]:
        shown = (values[0], values[-1]) if scale == "smoke" else values + (extra or {}).get(scale, ())
        return [Run(f"{arch}-{column[0].lower()}{v}", recipe, (f"model.args.{key}={v}",),
                    {"Arch": arch, column: v}) for arch, recipe in archs for v in shown]
    return runs


def _depth_plots(column: str) -> tuple[Plot, ...]:
    return (Plot("curves", "curves.png", f"Loss and accuracy per epoch, by {column.lower()}", panel=column),
            Plot("bars", "test_accuracy.png", "Test accuracy", x=column, hue="Arch"),
            Plot("scatter", "params_vs_accuracy.png", "Parameters vs test accuracy", x="Params", hue="Arch"),
            Plot("lines", "time_vs_depth.png", f"Training time vs {column.lower()}", x=column, y="Train Time",
                 hue="Arch"))


# distillation: at medium scale (real CIFAR-10 on a 2-core CPU) the teacher gets more steps than the
# students, whose runs pay for the teacher's forward pass too; every student sees the same batches
# cpu scale: the teacher is the c10_rescnn recipe unchanged (20 whole epochs, ~150 s each on one core of this
# CPU), every student 5 x 100 steps (64,000 images), on the same batches per seed
DISTILL_BUDGET = {
    "smoke": ((), ()),
    "medium": (("phases.0.epochs=3", "max_steps_per_epoch=100"),
               ("phases.0.epochs=4", "max_steps_per_epoch=30")),
    "cpu": ((), ("phases.0.epochs=5", "max_steps_per_epoch=100")),
    "full": ((), ()),
}
RECIPE_ALPHA = 0.7  # c10_kd's alpha: the temperature sweep runs at it
EXTRA_ALPHAS = {"cpu": (0.3, 0.9)}  # at the recipe's T = 4


def _distill_runs(scale: str) -> list[Run]:
    teacher_set, student_set = DISTILL_BUDGET[scale]
    temperatures = (4.0,) if scale == "smoke" else (1.0, 2.0, 4.0, 8.0)
    kd = {"Role": "student + distillation"}
    runs = [Run("teacher", "c10_rescnn", teacher_set, {"Role": "teacher (ResidualCNN)", "T": "", "alpha": ""},
                seeded=False),
            Run("student", "c10_cnn", student_set, {"Role": "student baseline (SimpleCNN)", "T": "", "alpha": ""})]
    runs += [Run(f"student-kd-T{t:g}", "c10_kd", (*student_set, f"loss.distill.temperature={t}"),
                 {**kd, "T": t, "alpha": RECIPE_ALPHA}, teacher="teacher", compare_to="student")
             for t in temperatures]
    runs += [Run(f"student-kd-T4-a{a:g}", "c10_kd", (*student_set, "loss.distill.temperature=4.0",
                                                      f"loss.distill.alpha={a}"),
                 {**kd, "T": 4.0, "alpha": a}, teacher="teacher", compare_to="student")
             for a in EXTRA_ALPHAS.get(scale, ())]
    return runs


# ---------------------------------------------------------------- seed 003: training choices

C100 = "c100_scratch"
C100_SCALES = {"smoke": ("model.name=simple_cnn", "model.args={ stages = 2, width = 16 }",
                         "max_steps_per_epoch=8"),
               "full": ()}
C100_NOTE = ("Seed 003 trains on CIFAR-100; the data here is whatever --data names (the report's Dataset "
             "column), and smoke scale swaps ResNet34 for a small CNN.")


def _lr_runs(scale: str) -> list[Run]:
    rates = (0.1, 0.001) if scale == "smoke" else (0.1, 0.01, 0.001, 1e-4)
    return [Run(f"lr{lr:g}", C100, (f"phases.0.optimizer.lr={lr}",), {"LR": lr}) for lr in rates]


GRID = {"smoke": ((16, 32), (1e-4,), (0.0, 0.1)), "full": ((128, 256, 400), (0.0, 1e-4, 5e-4), (0.0, 0.1))}


def _grid_runs(scale: str) -> list[Run]:
    sizes, decays, clips = GRID[scale]
    return [Run(f"bs{bs}-wd{wd:g}-clip{clip:g}", C100,
                (f"data.batch_size={bs}", f"phases.0.optimizer.weight_decay={wd}", f"grad_clip_value={clip}"),
                {"Batch Size": bs, "Weight Decay": wd, "Grad Clip": clip})
            for clip in clips for wd in decays for bs in sizes]


def _ablation_runs(scale: str) -> list[Run]:
    """All of the recipe's augmentations, each removed in turn (its table reset to defaults: off), then
    none (left out at smoke scale)."""
    stages = load_recipe(recipe_for(C100, scale)).augment.enabled()
    runs = [Run("all", C100, (), {"Removed": "-"})]
    runs += [Run(f"no-{stage}", C100, (f"augment.{stage}={{}}",), {"Removed": stage}) for stage in stages]
    if scale != "smoke":
        runs.append(Run("none", C100, tuple(f"augment.{stage}={{}}" for stage in stages), {"Removed": "all"}))
    return runs


OPTIMIZERS = (("SGD", "sgd", 0.1, 0.9), ("Adam", "adam", 0.01, 0.9), ("RMSprop", "rmsprop", 0.001, 0.0))


def _optimizer_runs(scale: str) -> list[Run]:
    return [Run(name, C100, (f"phases.0.optimizer.name={key}", f"phases.0.optimizer.lr={lr}",
                             f"phases.0.optimizer.momentum={momentum}"), {"Optimizer": name, "LR": lr})
            for name, key, lr, momentum in OPTIMIZERS]


# epochs of a step / first warm-restart cycle per scale (smoke trains 4 short epochs to show the shapes)
SCHEDULE_EPOCHS = {"smoke": ("phases.0.epochs=4", 2, 2, 1), "full": ("phases.0.epochs=120", 40, 10, 2)}


def _schedule_runs(scale: str) -> list[Run]:
    epochs, step_size, t_0, t_mult = SCHEDULE_EPOCHS[scale]
    variants = (("onecycle", ()), ("step", (f"phases.0.schedule.step_size={step_size}",)), ("cosine", ()),
                ("warm_restarts", (f"phases.0.schedule.t_0={t_0}", f"phases.0.schedule.t_mult={t_mult}")))
    return [Run(name, C100, (epochs, f"phases.0.schedule.name={name}", *extra), {"Schedule": name})
            for name, extra in variants]


def _trained_model(scale: str) -> list[Run]:
    return [Run("model", C100, (), {})]


CURVES = Plot("curves", "curves.png", "Loss and accuracy per epoch")
DYNAMICS = Plot("dynamics", "dynamics.png",
                "Training dynamics: learning rate, gradient norm, early-stopping points, peak memory")
# cpu scale of depth_mlp: to convergence on a val split (convert mnist with --val-fraction)
DEPTH_MLP_CPU = ("phases.0.epochs=30", "data.val_split=val", "phases.0.early_stopping.metric=val_loss",
                 "phases.0.early_stopping.patience=3")
STUDIES = {s.name: s for s in (
    Study("depth_mlp", "MLP vs residual MLP on MNIST at depths 2/4/8 (cpu scale: and 16)", "seed 001, ex. 1.1-1.2",
          _depth_runs(MNIST_ARCHS, "depth", "Depth", (2, 4, 8), {"cpu": (16,)}),
          {"smoke": ("phases.0.epochs=2",), "medium": (), "cpu": DEPTH_MLP_CPU, "full": ()},
          (*_depth_plots("Depth"), DYNAMICS), extra=("Train Acc", "Best Test Acc", "Epochs"),
          note="medium scale is the recipe itself (5 epochs): it already fits a CPU. cpu scale trains to "
               "convergence: up to 30 epochs, stopped when the val loss has not improved for 3, and tested "
               "with the weights of its best val loss.",
          seeds={"cpu": 3}),
    Study("depth_cnn", "Simple CNN vs residual CNN on CIFAR-10 at 2/3/4 stages", "seed 001, ex. 1.3",
          _depth_runs(CIFAR_ARCHS, "stages", "Stages", (2, 3, 4)),
          {"smoke": (), "cpu": ("phases.0.epochs=4", "max_steps_per_epoch=100"), "full": ()},
          (*_depth_plots("Stages"), DYNAMICS), extra=("Train Acc", "Best Test Acc"),
          note="cpu scale: the same budget for every model, 4 epochs x 100 steps of 128 (51,200 images, "
               "1.1 passes), the recipe's augmentation and cosine schedule.",
          seeds={"cpu": 2}),
    Study("distill", "Knowledge distillation: residual-CNN teacher -> simple-CNN student",
          "seed 001, ex. 2.2", _distill_runs, {"smoke": (), "medium": (), "cpu": (), "full": ()},
          (Plot("bars", "baseline_vs_distilled.png", "Teacher, baseline and distilled students", x="Model"),
           Plot("lines", "temperature.png", "Distilled student accuracy vs temperature (a line per alpha)",
                x="T", hue="alpha", reference="student"),
           Plot("kd_losses", "kd_losses.png", "Distillation losses (hard = CE, soft = T^2 KL, combined)"),
           Plot("scatter", "size_vs_accuracy.png", "Model size vs test accuracy", x="Params", hue="Role"),
           CURVES, DYNAMICS),
          extra=("Improvement",),
          note="Improvement is the distilled student's test accuracy minus the baseline student's of the same "
               "seed (the same initialisation and batches). At cpu scale the teacher trains once, the recipe's "
               "20 epochs of the whole training set; every student 5 x 100 steps.",
          seeds={"smoke": 2, "cpu": 3}),
    Study("lr_sweep", "Learning-rate sweep (OneCycle max_lr)", "seed 003, ex. 1", _lr_runs, C100_SCALES,
          (CURVES, Plot("lr", "lr_curves.png", "Learning rate per epoch"),
           Plot("lines", "lr_vs_accuracy.png", "Test accuracy vs max learning rate", x="LR")),
          extra=("Best Test Acc",), note=C100_NOTE),
    Study("grid", "Batch size x weight decay x gradient clipping", "seed 003, ex. 2", _grid_runs, C100_SCALES,
          (Plot("heatmap", "grid_heatmaps.png", "Test accuracy", x="Batch Size", hue="Weight Decay",
                panel="Grad Clip"),), note=C100_NOTE),
    Study("aug_ablation", "Augmentation ablation (each augmentation removed in turn)", "seed 003, ex. 3",
          _ablation_runs, C100_SCALES,
          (Plot("bars", "ablation_accuracy.png", "Test accuracy by removed augmentation", x="Removed"),
           Plot("bars", "ablation_gap.png", "Train - test accuracy gap by removed augmentation", x="Removed",
                y="Gap"), CURVES),
          extra=("Train Acc", "Gap"),
          note=C100_NOTE + " Train accuracy is measured on the augmented (MixUp/CutMix: mixed) batches."),
    Study("optimizers", "Optimizers: SGD vs Adam vs RMSprop", "seed 003, ex. 7", _optimizer_runs, C100_SCALES,
          (CURVES, Plot("bars", "optimizer_accuracy.png", "Test accuracy by optimizer", x="Optimizer")),
          extra=("Best Test Acc",), note=C100_NOTE),
    Study("schedules", "LR schedules: OneCycle, step, cosine, warm restarts", "seed 003, ex. 8",
          _schedule_runs, C100_SCALES, (Plot("lr", "lr_curves.png", "Learning rate per epoch"), CURVES),
          extra=("Best Test Acc",), note=C100_NOTE),
    Study("filters", "First-layer convolution filters and their feature maps", "seed 003, ex. 5",
          _trained_model, C100_SCALES, probe="filters", note=C100_NOTE),
    Study("stride_padding", "Stride and padding: output shapes and feature maps", "seed 003, ex. 6",
          _trained_model, C100_SCALES, probe="stride_padding", note=C100_NOTE),
    Study("loss_landscape", "Loss landscape: filter-normalized random directions (Li et al. 2018)",
          "seed 003, ex. 4", _trained_model, C100_SCALES, probe="loss_landscape", note=C100_NOTE),
)}


def get_study(name: str) -> Study:
    if name not in STUDIES:
        raise UserError(f"unknown study '{name}'{did_you_mean(name, STUDIES)}; "
                        f"choose one of {', '.join(STUDIES)}")
    return STUDIES[name]


def study_runs(study: Study, scale: str) -> list[Run]:
    """The study's runs at `scale` with the scale's overrides, each seeded run once per seed (labels
    unique, teachers known; a student is compared with the baseline of its own seed)."""
    if scale not in study.scales:
        raise UserError(f"study '{study.name}' has no {scale} scale; choose one of {', '.join(study.scales)}")
    seeds = study.seeds.get(scale, 1)
    runs = []
    for run in study.runs(scale):
        overrides = (*study.scales[scale], *run.overrides)
        recipe = recipe_for(run.recipe, scale)
        if seeds == 1 or not run.seeded:
            runs.append(Run(run.label, recipe, overrides, run.facts, run.teacher, run.compare_to, run.seeded,
                            run.label))
            continue
        for seed in range(seeds):
            compare_to = f"{run.compare_to}-seed{seed}" if run.compare_to else ""
            runs.append(Run(f"{run.label}-seed{seed}", recipe, (*overrides, f"seed={seed}"),
                            {**run.facts, "Seed": seed}, run.teacher, compare_to, True, run.label))
    labels = [r.label for r in runs]
    assert len(set(labels)) == len(labels), f"duplicate run labels in {study.name}"
    assert all(r.teacher in labels for r in runs if r.teacher), f"unknown teacher in {study.name}"
    assert all(r.compare_to in labels for r in runs if r.compare_to), f"unknown baseline in {study.name}"
    return runs


def study_run_dir(study_dir: Path, label: str) -> Path:
    return study_dir / "runs" / label
