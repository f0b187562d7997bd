"""The training loop: recipe -> data on the device -> model -> phases of epochs of steps -> test, export.

`train(recipe, options)` reads top to bottom: `start` (device, data, model, run folder, resume),
then for each phase `prepare_phase` (trainable modules, optimizer, schedule, DDP, compile) and its
epochs (`train_one_epoch`, then `end_epoch`: evaluation, metrics, early stopping, checkpoint), then
`finish` (the best weights of the deciding phase, the test, the exported model, reports, summary).
It runs on one device or as one of N processes under `accelerate launch` / `torchrun`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import resource
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm  # widget bars in notebooks (trainer.api), the console bar elsewhere

from beton_trainer.common.errors import UserError
from beton_trainer.common.files import write_json, write_text
from beton_trainer.common.schema import to_dict
from beton_trainer.format.dataset import Split, load_manifest
from beton_trainer.models import count_parameters, model_summary
from beton_trainer.pipelines import build_loader
from beton_trainer.pipelines.base import Loader, LoaderOptions, varied_sizes
from beton_trainer.pipelines.tensor_loader import TensorLoader
from beton_trainer.trainer import checkpoint
from beton_trainer.trainer.config import (
    EarlyStoppingConfig,
    PhaseConfig,
    Recipe,
    load_recipe,
    recipe_differences,
    recipe_to_toml,
)
from beton_trainer.trainer.distributed import check_same_data
from beton_trainer.trainer.ema import ModelEma
from beton_trainer.trainer.metrics import topk_correct
from beton_trainer.trainer.modelio import make_model, model_info, save_weights
from beton_trainer.trainer.optim import (
    build_optimizer,
    build_scheduler,
    check_module_prefixes,
    param_groups,
    set_trainable,
)
from beton_trainer.trainer.profiling import StepProfiler
from beton_trainer.trainer.report import plot_history, write_reports
from beton_trainer.trainer.runlog import MetricsLog, new_run_dir, run_environment
from beton_trainer.trainer.step import EpochSums, EpochTotals, TrainStep, configure_backends
from beton_trainer.trainer.syncs import SyncCheck
from beton_trainer.trainer.teacher import load_teacher, train_teacher_first
from beton_trainer.trainer.timing import EpochTimes, Feed, StepTimer, starvation_warning

LOG_EVERY = 50  # steps between progress-bar loss updates and non-finite checks (each one syncs the device)
WARMUP_STEPS = 2  # first steps of an epoch the sync check leaves alone (epoch set-up, lazy optimizer state)


@dataclass
class RunOptions:
    """What the command line decides besides the recipe, and what the Python API (`trainer.api`) builds in Python."""

    run_dir: str | None = None
    resume: str | None = None  # "auto" (the newest good checkpoint of run_dir, if any) or a run/checkpoint path
    cpu: bool = False
    deterministic: bool = False
    check_syncs: bool = False  # fail on any host-device sync in a steady-state step
    profile_steps: int = 0  # profile this many steps after warm-up (trace and table in the run folder)
    model: nn.Module | None = None  # trained in place of the registry model (recipe.model.name "custom:<Class>")
    splits: dict[str, Split] | None = None  # in-memory data for the tensor backend, in place of data.path
    metrics: dict[str, Callable] = field(default_factory=dict)  # name -> fn(logits, labels), on val and test


@dataclass
class Progress:
    """Where a run stands: what progress.json in each checkpoint holds."""

    phase: int = 0
    epoch: int = 0  # within the phase
    batch: int = 0  # the next batch of the epoch
    global_step: int = 0
    best: float | None = None  # early stopping's best value in the current phase
    bad_epochs: int = 0
    sums: dict = field(default_factory=dict)  # EpochTotals over all ranks so far this epoch (mid-epoch saves)
    rows: int = 0  # metrics.csv rows written
    train_time: float = 0.0
    num_processes: int = 1
    scheduler: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> Progress:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


class EarlyStopping:
    """Counts epochs without improvement of the watched metric; its state lives in `Progress`."""

    def __init__(self, config: EarlyStoppingConfig, progress: Progress) -> None:
        self.config, self.progress = config, progress

    def observe(self, row: dict) -> bool:
        """Record this epoch's value; True when it is the phase's best so far."""
        if not self.config.metric:
            return False
        value, best = row[self.config.metric], self.progress.best
        improved = best is None or (value < best if self.config.mode == "min" else value > best)
        if improved:
            self.progress.best, self.progress.bad_epochs = value, 0
        else:
            self.progress.bad_epochs += 1
        return improved

    @property
    def exhausted(self) -> bool:
        return bool(self.config.metric) and self.progress.bad_epochs >= self.config.patience


class Stop:
    """SIGTERM/SIGINT: finish the current step, write a checkpoint, exit non-zero."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True


class FiniteWatch:
    """Stops training once the loss (or, without fp16's loss scaler, the gradient norm) is not finite.

    Checked only at logging steps and before each checkpoint (each check syncs the device), so a
    checkpoint never holds weights trained past a non-finite step.
    """

    def __init__(self, check_grads: bool, ckpt_root: Path) -> None:
        self.check_grads = check_grads
        self.ckpt_root = ckpt_root
        self.last: tuple[float, int] | None = None  # (loss, step) at the last finite check

    def check(self, totals: EpochTotals, step: int, lr: float) -> float:
        """The mean training loss of the epoch so far."""
        loss = totals.loss
        what, value = ("gradient norm", totals.nonfinite_grad_norm_sum) if self.check_grads and math.isfinite(loss) \
            else ("loss", loss)
        if math.isfinite(value):
            self.last = (loss, step)
            return loss
        last = f"last finite loss {self.last[0]:.4g} at step {self.last[1]}" if self.last else "no finite loss seen"
        raise UserError(f"the training {what} became {value} by step {step} (lr {lr:.3g}; {last}); lower the "
                        f"learning rate or enable grad_clip_norm; the last good checkpoint is kept in {self.ckpt_root}")


@dataclass
class Data:
    manifest: dict
    train: Loader
    val: Loader | None
    test: Loader


def split_loader(recipe: Recipe, accelerator: Accelerator, split: str, train: bool,
                 memory: dict[str, Split] | None = None) -> Loader:
    """One split's loader, sharded over the processes: the recipe's backend over the files at data.path, or
    the tensor backend over an in-memory split (`memory`, from the Python API)."""
    options = LoaderOptions(
        data_dir=Path(recipe.data.path), split=split, train=train, spec=recipe.augment,
        batch_size=recipe.data.batch_size if train else recipe.data.eval_batch_size,
        device=accelerator.device, seed=recipe.seed, rank=accelerator.process_index,
        world_size=accelerator.num_processes, num_workers=recipe.data.num_workers,
        label_smoothing=recipe.loss.label_smoothing, channels_last=recipe.channels_last,
        resolution=recipe.data.resolutions(),  # photos of varied sizes: crop sides, progressive resizing
        **recipe.data.memory_options(),  # the ffcv order and os_cache, the memory budget (README "Scale")
        max_batches=0 if train else recipe.max_eval_batches)  # smoke runs: a stratified subset
    return TensorLoader(options, memory[split]) if memory else build_loader(recipe.data.loader, options)


def build_data(recipe: Recipe, accelerator: Accelerator, memory: dict[str, Split] | None = None) -> Data:
    """The three loaders, each sharded over the processes and producing batches on the device."""
    if not recipe.data.path:
        raise UserError("no dataset: pass --data DIR (a folder made by `beton-convert`) or set data.path")
    if not memory:  # every rank reads the same records, or every rank stops with one line (before any collective)
        check_same_data(accelerator, recipe.data.path)
    manifest = memory["train"].manifest if memory else load_manifest(recipe.data.path)
    if recipe.data.val_split and recipe.data.val_split not in manifest["splits"]:
        raise UserError(f"the recipe validates on split '{recipe.data.val_split}' but {recipe.data.path} has only "
                        f"{', '.join(manifest['splits'])}; convert again with --val-fraction 0.1")

    def loader(split: str, train: bool) -> Loader:
        return split_loader(recipe, accelerator, split, train, memory)

    val = loader(recipe.data.val_split, False) if recipe.data.val_split else None
    return Data(manifest, loader("train", True), val, loader("test", False))


@torch.no_grad()
def evaluate(model: nn.Module, loader: Loader, recipe: Recipe, accelerator: Accelerator, collect: bool = False,
             extra: dict[str, Callable] | None = None
             ) -> tuple[dict[str, float], torch.Tensor | None, torch.Tensor | None]:
    """Loss and accuracy over every sample the loader holds (the split, or with max_eval_batches its fixed
    stratified subset), each exactly once across ranks (sums reduced across ranks; a rank may have none);
    with `collect`, also every prediction and label (gathered to the host once, at the end). `extra` metrics
    (the Python API's) are functions of the split's logits and labels, all of them, gathered to the host once.

    `model` is a plain module (`Run.eval_model`): no collective runs in its forward."""
    model.eval()
    sums = torch.zeros(4, device=accelerator.device, dtype=torch.float64)  # loss sum, correct, top-5 correct, count
    preds, labels, outputs = [], [], []
    num_classes = 0
    loader.set_epoch(0)
    for images, targets in loader:
        with accelerator.autocast():
            logits = model(images)
            if recipe.tta_flip:
                logits = (logits + model(images.flip(3))) / 2
        logits = logits.float()
        num_classes = logits.shape[1]
        loss = F.cross_entropy(logits, targets, label_smoothing=recipe.loss.label_smoothing, reduction="sum")
        pred = logits.argmax(1)
        sums += torch.stack([loss.double(), (pred == targets).sum().double(),
                             topk_correct(logits, targets, 5).double(), sums.new_full((), targets.numel())])
        if collect:
            preds.append(pred)
        if collect or extra:
            labels.append(targets)
        if extra:
            outputs.append(logits)
    loss_sum, correct, top5, count = accelerator.reduce(sums, reduction="sum").tolist()
    metrics = {"loss": loss_sum / count, "accuracy": correct / count, "count": int(count)}
    if num_classes > 5:  # top-5 of five classes or fewer says nothing
        metrics["top5_accuracy"] = top5 / count
    all_labels = gathered(labels, torch.int64) if collect or extra else None
    if extra:
        all_logits = gathered(outputs, torch.float32)
        metrics.update({name: float(fn(all_logits, all_labels)) for name, fn in extra.items()})
    if not collect:
        return metrics, None, None
    return metrics, gathered(preds, torch.int64), all_labels


def gathered(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """This rank's batches of one output, concatenated over all ranks on the host (a rank without samples
    adds nothing: torch.cat skips 1-D empty tensors)."""
    mine = torch.cat(parts).cpu() if parts else torch.empty(0, dtype=dtype)
    return torch.cat(gather_object([mine]))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plain_model(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """The bare module under the DDP and torch.compile wrappers (for state dicts)."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


@dataclass
class Phase:
    """One phase's prepared objects and its step."""

    index: int
    config: PhaseConfig
    step: TrainStep
    group_names: list[str]
    trainable: int


@dataclass
class Run:
    """Everything the epochs of a run share."""

    recipe: Recipe
    options: RunOptions
    accelerator: Accelerator
    data: Data
    info: dict  # model.json
    model: nn.Module  # the plain module (wrapped per phase inside Phase.step.model)
    teacher: nn.Module | None
    ema: ModelEma | None
    run_dir: Path
    progress: Progress
    steps_per_epoch: int
    log: MetricsLog | None = None  # the main process's
    resumed_from: Path | None = None
    stop: Stop = field(default_factory=Stop)
    syncs: SyncCheck = field(default_factory=lambda: SyncCheck(False, torch.device("cpu")))
    finite: FiniteWatch | None = None
    resumed_phase: Phase | None = None  # the phase a checkpoint was loaded into
    timer: StepTimer | None = None  # data wait vs. step, per epoch
    profiler: StepProfiler | None = None
    epoch_times: EpochTimes | None = None  # the last epoch's
    train_start: float = 0.0
    first_step_at: float | None = None  # Unix time this process began its first training step (start-up cost)
    finished_early: bool = False

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "best.safetensors"

    def eval_model(self, phase: Phase) -> nn.Module:
        """The module evaluated, kept and exported: the EMA's, else the plain one under the DDP and compile
        wrappers. Not DDP's: its forward broadcasts BatchNorm buffers (a collective), which hangs a rank whose
        shard holds fewer evaluation batches than rank 0's (none, when a split has fewer samples than ranks).
        Not the compiled one: compile modes reduce-overhead and max-autotune replay CUDA graphs, whose outputs
        the next replay overwrites (flip TTA's second forward, the logits kept for metrics); evaluation is
        forward-only, and runs eager (only a GPU can time what that costs: benchmarks/device/README.md)."""
        return self.ema.module if self.ema is not None else plain_model(self.accelerator, phase.step.model)


def prepare_phase(run: Run, index: int) -> Phase:
    """Freeze/unfreeze, build the phase's optimizer and schedule, (re)wrap for DDP and compile."""
    accelerator, recipe, config = run.accelerator, run.recipe, run.recipe.phases[index]
    accelerator.free_memory()
    trainable = set_trainable(run.model, config.train_modules)
    groups = param_groups(run.model, config)
    optimizer = build_optimizer(groups, config.optimizer, accelerator.device.type)
    scheduler = build_scheduler(optimizer, config.schedule, epochs=config.epochs,
                                steps_per_epoch=run.steps_per_epoch)
    model, optimizer = accelerator.prepare(run.model, optimizer)
    if recipe.compile:  # recompiled per phase: freezing changes the backward graph
        model = torch.compile(model, mode=recipe.compile_mode)
    step = TrainStep(accelerator, model, optimizer, scheduler, recipe, teacher=run.teacher, ema=run.ema)
    return Phase(index, config, step, [g["name"] for g in groups], trainable)


def build_model(recipe: Recipe, data: Data, accelerator: Accelerator,
                given: nn.Module | None = None) -> tuple[dict, nn.Module]:
    """The recipe's model (or `given`, one built in Python) on the device, after checking that every name the
    recipe uses exists and that a batch of this data goes through it (before any file is written).
    model.json also records the normalization, which anyone feeding the exported model needs."""
    info = {**model_info(recipe, data.manifest), "mean": data.manifest["mean"], "std": data.manifest["std"]}
    model = given if given is not None else make_model(info, recipe.model.pretrained)
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.to(accelerator.device)
    for i, phase in enumerate(recipe.phases):
        check_module_prefixes(model, phase.train_modules, f"phases.{i}.train_modules")
        for group in phase.param_groups:
            check_module_prefixes(model, group.modules, f"phases.{i}.param_groups.modules")
    early_metrics = {p.early_stopping.metric for p in recipe.phases if p.early_stopping.metric}
    known = {f"{s}_{m}" for s in ("train", "test") + (("val",) if data.val else ()) for m in ("loss", "accuracy")}
    for metric in early_metrics - known:
        raise UserError(f"early stopping watches '{metric}', which this run does not compute; choose one of "
                        f"{', '.join(sorted(known))}" + ("" if data.val else " (or set data.val_split=val)"))
    data.train.set_epoch(0)  # every rank has a train batch; a rank may have no test samples
    probe = next(iter(data.train))[0][:2]
    try:
        with torch.no_grad():
            model.eval()(probe)
    except RuntimeError as exc:
        raise UserError(f"model '{recipe.model.name}' cannot take images of shape {tuple(probe.shape[1:])} from "
                        f"{recipe.data.path} ({str(exc).splitlines()[0]}); choose a model for this data") from None
    return info, model


def finished_already(options: RunOptions, accelerator: Accelerator) -> bool:
    """`--resume auto` of a run whose summary.json is written: nothing to do, and no error, since a job
    restarted after the run ended (torchrun --max-restarts, a requeued SLURM job) must not fail. The main
    process decides (other nodes may not see its run folder) and tells every rank."""
    done = options.resume == "auto" and accelerator.is_main_process \
        and (Path(options.run_dir) / "summary.json").is_file()
    if not broadcast_object_list([done])[0]:
        return False
    if accelerator.is_main_process:
        print(f"the run in {options.run_dir} has finished (summary.json is written); nothing to resume")
    accelerator.end_training()
    return True


def cpu_threads() -> int:
    """Torch's CPU threads for the run: OMP_NUM_THREADS (torchrun sets 1 per process), else every CPU this
    process may use. Set explicitly because importing FFCV, which every .beton reader does, drops torch to one
    thread: the count, and so the last bits of CPU results, would depend on what the process did before."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else len(os.sched_getaffinity(0))


def start(recipe: Recipe, options: RunOptions) -> Run | None:
    """Device, data, model and teacher, the run folder, and where to start (fresh or a checkpoint); None when
    `--resume auto` finds the run finished."""
    resume_path = Path(options.resume) if options.resume and options.resume != "auto" else None
    if options.resume == "auto" and not options.run_dir:
        raise UserError("--resume auto needs --run-dir: the folder of the run to continue")
    accelerator = Accelerator(mixed_precision=recipe.precision, cpu=options.cpu,
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=10))])
    if options.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    backends = configure_backends(accelerator.device, deterministic=options.deterministic,
                                  strict_fp32=recipe.strict_fp32)
    set_seed(recipe.seed)
    if finished_already(options, accelerator):
        return None
    models_log = logging.getLogger("beton_trainer.models")
    if accelerator.is_main_process and not models_log.handlers:  # the model builders report what they did
        models_log.addHandler(logging.StreamHandler(sys.stdout))  # once per process (the API runs many)
        models_log.setLevel(logging.INFO)
    data = build_data(recipe, accelerator, options.splits)
    torch.set_num_threads(cpu_threads())
    info, model = build_model(recipe, data, accelerator, options.model)
    if recipe.loss.distill.teacher:
        train_teacher_first(recipe, options.cpu)
    teacher = load_teacher(recipe.loss.distill.teacher, data.manifest, accelerator.device, recipe.channels_last) \
        if recipe.loss.distill.teacher else None

    # the main process checks and makes the folder, the others take its path (a default name holds the time)
    run_dir_arg = checkpoint.run_folder(resume_path) if resume_path else options.run_dir
    fresh = options.resume == "auto" and not Path(run_dir_arg).exists()  # auto: nothing to resume yet
    made = new_run_dir(run_dir_arg, recipe.name, resume=bool(options.resume) and not fresh,
                       need_bytes=checkpoint.space_needed(model)) if accelerator.is_main_process else None
    run_dir = broadcast_object_list([made])[0]
    ema = ModelEma(model, recipe.ema_decay) if recipe.ema_decay else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    steps = len(data.train) if not recipe.max_steps_per_epoch else min(len(data.train), recipe.max_steps_per_epoch)
    run = Run(recipe, options, accelerator, data, info, model, teacher, ema, run_dir,
              Progress(num_processes=accelerator.num_processes), steps,
              syncs=SyncCheck(options.check_syncs, accelerator.device), timer=StepTimer(accelerator.device),
              profiler=StepProfiler(options.profile_steps, run_dir, accelerator.device, accelerator.process_index,
                                    accelerator.is_main_process),
              finite=FiniteWatch(check_grads=recipe.precision != "fp16", ckpt_root=run_dir / "checkpoints"))
    run.resumed_phase = resume(run, resume_path)
    if run.main:
        if run.resumed_from is None:  # also a --resume of a run killed before its first checkpoint
            write_text(run_dir / "config.toml", recipe_to_toml(recipe))
            if hasattr(model, "pretrained_report"):  # what pretrained loading copied, and what it left fresh
                write_json(run_dir / "pretrained.json", dataclasses.asdict(model.pretrained_report))
        environment = run_environment(recipe.seed, data.manifest, accelerator.num_processes, str(accelerator.device))
        write_json(run_dir / "environment.json", {**environment, "backends": backends})
        print(f"{model_summary(model)}\nrun folder: {run_dir}"
              + (f"\nresuming from {run.resumed_from}" if run.resumed_from else ""))
        run.log = MetricsLog(run_dir, tensorboard=recipe.tensorboard, wandb=recipe.wandb, config=to_dict(recipe),
                             keep_rows=run.progress.rows)
    run.train_start = time.perf_counter() - run.progress.train_time
    return run


def resume(run: Run, resume_path: Path | None) -> Phase | None:
    """Load the newest checkpoint that loads (with `--resume`); its phase, prepared, or None for a fresh run.

    `--resume auto` on a folder without checkpoints starts a fresh run there (so a restarted job, e.g.
    under `torchrun --max-restarts`, can always pass the same command line).
    """
    if not run.options.resume:
        return None
    saved_config = run.run_dir / "config.toml"
    if saved_config.is_file():  # a checkpoint only fits the recipe that wrote it
        changed = recipe_differences(load_recipe(str(saved_config)), run.recipe)
        if changed:
            raise UserError(f"the recipe differs from the one {run.run_dir} was started with "
                            f"({', '.join(changed[:5])}); resume with the same recipe and --set overrides "
                            f"(see {saved_config})")
    tried = checkpoint.candidates(resume_path or run.run_dir)
    for ckpt in tried:
        saved = checkpoint.read_progress(ckpt)  # None (with a warning) when its files are damaged
        if saved is None:
            continue
        candidate = Progress.from_dict(saved)
        # saved at the end of a phase (as the start of the next): it holds the finished phase's optimizer
        boundary = candidate.phase > 0 and candidate.epoch == 0 and candidate.batch == 0
        phase = prepare_phase(run, candidate.phase - boundary)
        if not checkpoint.load(run.accelerator, ckpt):
            continue
        if candidate.num_processes == run.accelerator.num_processes:
            phase.step.scheduler.load_state_dict(candidate.scheduler)
        else:  # each process's share of the data depends on their number: the epoch restarts
            candidate.batch, candidate.num_processes, candidate.sums = 0, run.accelerator.num_processes, {}
            checkpoint.fast_forward(phase.step.scheduler, candidate.epoch * run.steps_per_epoch)
        phase.step.last_lrs = phase.step.scheduler.get_last_lr()
        if boundary:  # the new phase starts with its own fresh optimizer and schedule, as in an uninterrupted run
            phase = start_phase(run, candidate.phase)
        if candidate.epoch == 0 and run.main:  # no best weights of this phase yet: any are an earlier phase's
            run.best_path.unlink(missing_ok=True)
        run.progress, run.resumed_from = candidate, ckpt
        return phase
    if tried:
        raise UserError(f"no usable checkpoint in {run.run_dir}/checkpoints ({len(tried)} tried); "
                        "start a new run without --resume")
    return None


def save_checkpoint(run: Run, current: Phase, **where: int | dict) -> None:
    """A checkpoint of the current state, with `where` (phase/epoch/batch/sums) recorded in progress.json."""
    p = run.progress
    for key, value in where.items():
        setattr(p, key, value)
    p.scheduler = current.step.scheduler.state_dict()
    p.rows = len(run.log.rows) if run.log else 0
    p.train_time = time.perf_counter() - run.train_start
    checkpoint.save(run.accelerator, run.ckpt_root, dataclasses.asdict(p))


def train_one_epoch(run: Run, phase: Phase, epoch: int, epoch_number: int) -> tuple[EpochTotals, float, int]:
    """The epoch's steps (from the resume point); its totals over all ranks, wall seconds and first batch."""
    p, step, accelerator = run.progress, phase.step, run.accelerator
    step.model.train()
    start_batch = p.batch if (phase.index, epoch) == (p.phase, p.epoch) else 0
    # a mid-epoch checkpoint holds the sums over all processes: the main process carries them on
    carried = EpochTotals(**p.sums) if start_batch and run.main and p.sums else None
    sums = EpochSums(accelerator.device, carried)
    run.data.train.set_epoch(epoch_number, start_batch)
    epoch_start = time.perf_counter()
    bar = tqdm(total=run.steps_per_epoch, initial=start_batch, disable=not run.main, leave=False,
               desc=f"epoch {epoch_number + 1}/{run.recipe.total_epochs}",
               mininterval=0.1 if sys.stderr.isatty() or "ipykernel" in sys.modules else 30)
    batches = iter(run.data.train)
    every = run.recipe.checkpoint_every_steps
    for index in range(start_batch, run.steps_per_epoch):
        done = index + 1
        save_now = (bool(every) and (p.global_step + 1) % every == 0 or run.stop.requested) \
            and done < run.steps_per_epoch
        # logging steps (the same in every run: the gradient norm is sampled there) may sync, and so may a
        # checkpoint step (which a signal can make of any step, so it samples no gradient norm)
        log_now = done % LOG_EVERY == 0 or done == run.steps_per_epoch
        run.profiler.before_step()
        step.label = run.profiler.label
        with run.syncs.watch(steady=not (log_now or save_now) and index - start_batch >= WARMUP_STEPS):
            run.timer.mark()
            with step.label("data"):
                images, targets = next(batches)
            run.timer.mark()
            if run.first_step_at is None:
                run.first_step_at = time.time()
            step(images, targets, sums, log=log_now)
            run.timer.mark()
        run.timer.count(targets.shape[0])
        run.profiler.after_step()
        p.global_step += 1
        bar.update(1)
        if log_now or save_now:
            loss = run.finite.check(EpochSums.totals(sums.stacked()), p.global_step, step.last_lrs[0])
            bar.set_postfix(loss=f"{loss:.4f}")
        if save_now:
            reduced = EpochSums.totals(accelerator.reduce(sums.stacked(), reduction="sum"))
            save_checkpoint(run, phase, phase=phase.index, epoch=epoch, batch=done, sums=dataclasses.asdict(reduced))
            if run.stop.requested:
                raise UserError(f"stopped by signal at step {p.global_step}; checkpoint written to {run.ckpt_root}; "
                                f"continue with --run-dir {run.run_dir} --resume auto")
    bar.close()
    epoch_time = time.perf_counter() - epoch_start
    run.epoch_times = run.timer.read()
    totals = EpochSums.totals(accelerator.reduce(sums.stacked(), reduction="sum"))
    run.finite.check(totals, p.global_step, step.last_lrs[0])
    return totals, epoch_time, start_batch


def end_epoch(run: Run, phase: Phase, epoch: int, epoch_number: int, totals: EpochTotals, epoch_time: float,
              start_batch: int) -> bool:
    """Evaluate, log the row, keep the phase's best weights, checkpoint; True when the phase stops early."""
    p, accelerator = run.progress, run.accelerator
    row = {"epoch": epoch_number + 1, "phase": phase.config.name, "train_loss": totals.loss,
           "train_accuracy": totals.correct / totals.seen, "grad_norm": totals.grad_norm}
    if run.teacher is not None:
        row["kd_soft_loss"], row["kd_hard_loss"] = totals.kd_soft_sum / totals.seen, totals.kd_hard_sum / totals.seen
    for name, loader in ([("val", run.data.val)] if run.data.val else []) + [("test", run.data.test)]:
        metrics, _, _ = evaluate(run.eval_model(phase), loader, run.recipe, accelerator, extra=run.options.metrics)
        row.update({f"{name}_{key}": value for key, value in metrics.items() if key != "count"})
    row.update({f"lr_{n}": lr for n, lr in zip(phase.group_names, phase.step.last_lrs)})
    row.update(epoch_time_s=epoch_time, images_per_s=totals.seen / epoch_time if start_batch == 0 else "",
               peak_mem_mb=peak_memory_mb(accelerator.device))
    times = run.epoch_times  # this process's: waiting for batches vs. in the step
    row.update(data_wait_s=times.data_wait_s, step_s=times.step_s, data_wait_fraction=times.data_wait_s / epoch_time,
               input_device_s="" if times.input_device_s is None else times.input_device_s,
               loader_images_per_s=times.loader_images_per_s or "")
    stopping = EarlyStopping(phase.config.early_stopping, p)
    if stopping.observe(row) and run.main:
        save_weights(run.eval_model(phase), run.best_path)
    if run.main:
        run.log.log(row)
        shown = {k: f"{v:.4f}" for k, v in row.items() if k.endswith(("loss", "accuracy"))}
        print(f"epoch {row['epoch']}/{run.recipe.total_epochs} {phase.config.name}: "
              + " ".join(f"{k} {v}" for k, v in shown.items()) + f" ({epoch_time:.1f}s)")
    stop_phase = stopping.exhausted
    next_phase, next_epoch = (phase.index + 1, 0) if stop_phase or epoch + 1 == phase.config.epochs \
        else (phase.index, epoch + 1)
    if next_phase != phase.index:  # early stopping keeps the best of each phase
        p.best, p.bad_epochs = None, 0
    if next_phase < len(run.recipe.phases):
        save_checkpoint(run, phase, phase=next_phase, epoch=next_epoch, batch=0, sums={})
    if run.stop.requested:
        raise UserError(f"stopped by signal after epoch {row['epoch']}; continue with --run-dir {run.run_dir} "
                        "--resume auto")
    if stop_phase and run.main:
        print(f"early stopping: {phase.config.early_stopping.metric} has not improved for "
              f"{phase.config.early_stopping.patience} epochs")
    return stop_phase


def start_phase(run: Run, index: int) -> Phase:
    """A new phase: its objects, and no best weights yet (those of an earlier phase do not decide the result)."""
    phase = prepare_phase(run, index)
    if run.main:
        run.best_path.unlink(missing_ok=True)
        print(f"phase {index + 1}/{len(run.recipe.phases)} '{phase.config.name}': {phase.config.epochs} epochs, "
              f"{phase.trainable:,} trainable parameters, groups {', '.join(phase.group_names)}")
    return phase


def finish(run: Run, phase: Phase) -> dict:
    """Test the deciding phase's best weights (or the last ones), export them, write reports and summary."""
    accelerator = run.accelerator
    run.profiler.finish()  # a run shorter than --profile asked for still writes what it profiled
    final = run.eval_model(phase)
    # rank 0 wrote best.safetensors, maybe moments ago and maybe on a disk only its node sees: it reads the
    # file and every rank tests those weights (each reading it could mix models across ranks)
    best = load_file(run.best_path) if run.main and run.best_path.is_file() else None
    best = broadcast_object_list([best])[0]
    if best is not None:
        final.load_state_dict(best)
    test, preds, labels = evaluate(final, run.data.test, run.recipe, accelerator, collect=True)
    wall = time.perf_counter() - run.train_start
    summary = {}
    if run.main:
        save_weights(final, run.run_dir / "model.safetensors")
        write_json(run.run_dir / "model.json", run.info)
        report = write_reports(run.run_dir, preds, labels, run.data.manifest["classes"])
        plots = plot_history(run.log.path, run.run_dir)
        run.log.close()
        rates = [float(r["images_per_s"]) for r in run.log.rows if r.get("images_per_s") not in ("", None)]
        summary = {"recipe": run.recipe.name, "test_accuracy": test["accuracy"], "test_loss": test["loss"],
                   "test_samples": test["count"], "epochs": len(run.log.rows), "early_stopped": run.finished_early,
                   "images_per_s": sum(rates) / len(rates) if rates else None, "wall_s": wall,
                   "parameters": count_parameters(final), "processes": accelerator.num_processes,
                   "first_step_at": run.first_step_at,
                   "run_dir": str(run.run_dir), "plots": [p.name for p in plots]}
        if "top5_accuracy" in test:
            summary["test_top5_accuracy"] = test["top5_accuracy"]
        if run.syncs.enabled:
            summary["sync_checked_steps"] = run.syncs.checked  # steady-state steps run under --check-syncs
        waits = [(float(r["data_wait_fraction"]), int(r["epoch"])) for r in run.log.rows
                 if r.get("data_wait_fraction") not in ("", None)]
        worst_wait, worst_epoch = max(waits) if waits else (None, None)
        summary.update(worst_data_wait_fraction=worst_wait, worst_data_wait_epoch=worst_epoch)
        write_json(run.run_dir / "summary.json", summary)
        print(report)
        print(f"test accuracy {test['accuracy']:.4f}  test loss {test['loss']:.4f}  ({test['count']} images)  "
              f"{summary['images_per_s'] or 0:,.0f} images/s  "
              + (f"data wait {worst_wait:.1%} (worst epoch)  " if waits else "")
              + f"{wall:.1f}s\nrun folder: {run.run_dir}")
        data = run.recipe.data
        feed = Feed(data.loader, accelerator.device.type, data.num_workers, data.batch_size,
                    not varied_sizes(run.data.manifest), tuple(run.recipe.augment.enabled()))
        warning = starvation_warning(worst_wait, worst_epoch, feed) if waits else None
        if warning:
            print(warning)
    accelerator.end_training()
    return summary


def train(recipe: Recipe, options: RunOptions) -> dict:
    """Run a recipe to the end; the summary (on the main process; {} on the others)."""
    run = start(recipe, options)
    if run is None:
        return {}
    p = run.progress
    phase = run.resumed_phase
    epoch_number = sum(c.epochs for c in recipe.phases[:p.phase]) + p.epoch
    for index in range(p.phase, len(recipe.phases)):
        if phase is None or phase.index != index:
            phase = start_phase(run, index)
        first_epoch = p.epoch if index == p.phase else 0
        for epoch in range(first_epoch, phase.config.epochs):
            totals, epoch_time, start_batch = train_one_epoch(run, phase, epoch, epoch_number)
            stop_phase = end_epoch(run, phase, epoch, epoch_number, totals, epoch_time, start_batch)
            epoch_number += 1
            if stop_phase:
                run.finished_early = True
                break
        p.phase, p.epoch, p.batch = index + 1, 0, 0
    return finish(run, phase)
