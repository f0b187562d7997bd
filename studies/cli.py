"""Run one of the seeds' studies and build its report: `beton-studies depth_mlp --data data/mnist`.

Each run is a normal train.py run folder under <out>/<study>/runs/<label>; re-running a study skips the
runs that finished (so an interrupted study continues) and rebuilds <out>/<study>/report.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from beton_trainer.common.errors import UserError, run_cli
from beton_trainer.format.dataset import load_manifest
from beton_trainer.studies import landscape, probes, trained
from beton_trainer.studies.catalog import SCALES, STUDIES, Run, Study, get_study, study_run_dir, study_runs
from beton_trainer.studies.plots import draw
from beton_trainer.studies.report import Section, markdown_table, write_report
from beton_trainer.studies.results import (
    RunResult,
    first_seeds,
    group_columns,
    group_rows,
    load_result,
    summary_rows,
    table_columns,
)
from beton_trainer.studies.runner import execute, is_done, plan

__all__ = ["main", "parse_args", "run"]

# per scale: sample images for the filter probes; images, 1-D points and 2-D grid side for the landscape
PROBE_SIZES = {"smoke": (4, 256, 11, 7), "full": (8, 1024, 21, 21)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    listing = "\n".join(f"  {s.name:<15} {s.title} ({s.source})" for s in STUDIES.values())
    parser = argparse.ArgumentParser(
        prog="beton-studies", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"studies:\n{listing}\n\nexamples:\n"
               "  beton-studies depth_mlp --scale medium --data data/mnist\n"
               "  beton-studies distill --scale smoke --data data/cifar10-jpeg --jobs 2\n"
               "  beton-studies loss_landscape --run runs/studies/filters/runs/model")
    parser.add_argument("study", help="which study (see the list below)")
    parser.add_argument("--scale", choices=SCALES, default="smoke",
                        help="smoke: minutes on a CPU; medium: ~10 CPU minutes (depth_mlp, distill); "
                             "cpu: seed 001's studies with several seeds, ~2 h of a 2-core CPU for the three; "
                             "full: the seeds' epochs (default smoke)")
    parser.add_argument("--out", default="runs/studies", help="output folder (default runs/studies)")
    parser.add_argument("--data", help="converted dataset folder for all runs (default: each recipe's)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at the same time (default 1)")
    parser.add_argument("--run", help="probe studies: a finished run folder to probe instead of training one")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: rebuild the report from the runs that have finished (an interrupted or "
                             "still running study); the others are listed as not trained yet")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {args.jobs}")
    return args


def train_runs(study: Study, runs: list[Run], study_dir: Path, data: Path | None,
               jobs: int, report_only: bool = False) -> list[RunResult]:
    """Train what is missing (with report_only, nothing) and read every run back (failed runs included)."""
    print(f"{study.name}: {len(runs)} runs in {study_dir / 'runs'}")
    jobs_planned = plan(runs, study_dir, data)
    if report_only:
        errors = {j.run.label: "" if is_done(j) else "not trained yet (--report-only)" for j in jobs_planned}
    else:
        errors = execute(jobs_planned, jobs)
    return [load_result(run, study_run_dir(study_dir, run.label), errors.get(run.label, "")) for run in runs]


def probe(study: Study, folder: Path, data: Path | None, scale: str) -> tuple[list[Section], dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, info = trained.load_model(folder, device)
    data_dir = data or trained.run_data_path(folder)
    n_images, n_landscape, points_1d, points_2d = PROBE_SIZES[scale]
    if study.probe == "loss_landscape":
        _, images, labels = trained.sample_images(data_dir, "train", n_landscape, device)
        fresh = trained.untrained_model(info, device)
        return landscape.landscape_probe({"trained": model, "untrained": fresh}, images, labels,
                                         points_1d=points_1d, points_2d=points_2d)
    raw, images, _ = trained.sample_images(data_dir, "test", n_images, device)
    conv = trained.first_conv(model)
    if study.probe == "filters":
        return probes.filters_probe(conv, raw, images)
    return probes.stride_padding_probe(conv, raw, images)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    study = get_study(args.study)
    runs = study_runs(study, args.scale)
    data = Path(args.data).resolve() if args.data else None
    if data is not None:
        load_manifest(data)  # a wrong --data fails here, not in every run
    study_dir = Path(args.out).resolve() / study.name
    start = time.perf_counter()
    if args.run:
        if not study.probe:
            raise UserError(f"--run only applies to the probe studies (filters, stride_padding, "
                            f"loss_landscape), not '{study.name}'; leave it out")
        folder = trained.check_run(Path(args.run).resolve())
        results = [load_result(Run(folder.name, "", facts={}), folder)]
    else:
        results = train_runs(study, runs, study_dir, data, args.jobs, args.report_only)

    rows = summary_rows(results)
    sections = [Section("Summary", table_columns(results, study.extra), rows)]
    table_rows, curve_results = rows, results
    if len(first_seeds(results)) < len(results):  # several seeds: mean ± std first, every run below it
        table_rows, curve_results = group_rows(rows), first_seeds(results)
        sections = [Section("Summary", group_columns(results, study.extra), table_rows),
                    Section("Runs", table_columns(results, study.extra), rows)]
    figures = {plot.file: draw(plot, table_rows, curve_results) for plot in study.plots}
    if study.probe and results[0].summary is not None:
        extra_sections, extra_figures = probe(study, results[0].folder, data, args.scale)
        sections += extra_sections
        figures |= extra_figures
    failed = [r for r in results if r.error]
    intro = [f"{study.source}; scale `{args.scale}`; {time.strftime('%Y-%m-%d %H:%M')}; {len(results)} runs "
             f"({len(failed)} failed); {time.perf_counter() - start:.0f} s this invocation.",
             "", f"Command: `beton-studies {' '.join(argv if argv is not None else sys.argv[1:])}`"]
    if study.note:
        intro += ["", study.note]
    path = write_report(study_dir, study.title, intro, sections, figures)
    for section in sections:
        print(f"\n{section.title}\n{markdown_table(section)}")
    print(f"\nreport: {path}")
    if failed:
        reasons = "; ".join(f"{r.run.label}: {r.error}" for r in failed)
        print(f"{len(failed)} of {len(results)} runs failed: {reasons}", file=sys.stderr)
        return 1
    return 0


def run() -> None:
    """The `beton-studies` command."""
    run_cli(main, sys.argv[1:])


if __name__ == "__main__":
    run()
