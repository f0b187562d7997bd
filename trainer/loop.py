"""The training loop: recipe -> data on the device -> model -> phases of epochs of steps -> test, export.

`train(recipe, options)` reads top to bottom: `start` (device, data, model, callbacks, run folder, resume),
then for each phase `start_phase` (trainable modules, optimizer, schedule, DDP, compile) and its epochs
(`train_one_epoch`, then `end_epoch`: evaluation, the epoch's row, checkpoint), then `finish` (the best
weights of the deciding phase, the test, the exported model, reports, summary). Everything else (EMA,
distillation, early stopping, the non-finite check, the sync check, the profiler, the loggers and the
progress bar) is a callback (`trainer.callbacks`), chosen by `default_callbacks` from the recipe and options.

It runs on one device or as one of N processes under `accelerate launch` / `torchrun`. A step between two
logging steps never waits on the host. Whether a rank enters a collective is only ever decided from values
every rank shares: the steps at which checkpoints and logging happen are fixed in advance, and a stop (a
signal to one rank, a callback's decision) takes effect only after it has been combined across ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from safetensors.torch import load_file
from torch import nn

from beton_trainer.common.errors import UserError
from beton_trainer.common.files import write_json, write_text
from beton_trainer.common.schema import to_dict
from beton_trainer.format.dataset import Split, load_manifest
from beton_trainer.models import count_parameters, model_summary
from beton_trainer.pipelines import build_loader
from beton_trainer.pipelines.base import Loader, LoaderOptions, varied_sizes
from beton_trainer.pipelines.tensor_loader import TensorLoader
from beton_trainer.trainer import checkpoint
from beton_trainer.trainer.callbacks import Callback, CallbackList
from beton_trainer.trainer.config import Recipe, load_recipe, recipe_differences, recipe_to_toml
from beton_trainer.trainer.console import ProgressBar
from beton_trainer.trainer.distributed import check_same_data
from beton_trainer.trainer.early_stopping import EarlyStopping
from beton_trainer.trainer.ema import Ema
from beton_trainer.trainer.metrics import topk_correct
from beton_trainer.trainer.modelio import make_model, model_info, save_weights
from beton_trainer.trainer.nonfinite import NonFiniteCheck
from beton_trainer.trainer.optim import (
    build_optimizer,
    build_scheduler,
    check_module_prefixes,
    param_groups,
    set_trainable,
)
from beton_trainer.trainer.profiling import StepProfiler
from beton_trainer.trainer.report import write_reports
from beton_trainer.trainer.runlog import CsvLogger, TensorBoardLogger, WandbLogger, new_run_dir, run_environment
from beton_trainer.trainer.state import Data, Phase, Progress, Run, RunOptions
from beton_trainer.trainer.step import EpochSums, EpochTotals, TrainStep, configure_backends
from beton_trainer.trainer.syncs import SyncCheck
from beton_trainer.trainer.teacher import Distillation
from beton_trainer.trainer.timing import Feed, StepTimer, starvation_warning

__all__ = ["LOG_EVERY", "cpu_threads", "default_callbacks", "evaluate", "split_loader", "train"]

LOG_EVERY = 50  # steps between logging steps (each syncs the device: progress, non-finite check, stop requests)
WARMUP_STEPS = 2  # first steps of an epoch the sync check leaves alone (epoch set-up, lazy optimizer state)


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
        verify=recipe.data.verify,  # the page checksums checked at start-up (format.integrity)
        max_batches=0 if train else recipe.max_eval_batches)  # smoke runs: a stratified subset
    return TensorLoader(options, memory[split]) if memory else build_loader(recipe.data.loader, options)


@contextlib.contextmanager
def closing_batches(loader: Loader) -> Iterator[Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """The loader's batches for one pass, closed when the pass ends, by an exception too: a backend's threads
    (FFCV's epoch thread, DALI's pipeline) stop then, not when a traceback that holds the pass is collected.
    pytest keeps a failed test's traceback to its end, and a daemon thread still inside torch when the
    interpreter exits aborts it (`terminate called without an active exception`: SIGABRT, the report lost)."""
    batches = iter(loader)
    try:
        yield batches
    finally:
        close = getattr(batches, "close", None)  # every backend's is a generator; a user's Loader may not be
        if close is not None:
            close()


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
    with closing_batches(loader) as batches:
        for images, targets in batches:
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


def agree(accelerator: Accelerator, *flags: bool) -> list[bool]:
    """Each flag, set on every rank when it is set on any (one all-reduce): what decides whether the ranks
    enter the next collectives (a checkpoint, another epoch) is the same on all of them."""
    if accelerator.num_processes == 1:
        return list(flags)
    mine = torch.tensor([float(f) for f in flags], device=accelerator.device)
    return [value > 0 for value in accelerator.reduce(mine, reduction="sum").tolist()]


def share_buffers(run: Run, phase: Phase) -> None:
    """Give every rank rank 0's buffers (BatchNorm's running statistics) before evaluating. DDP broadcasts them
    only at the start of a forward, so after an epoch's last step each rank's hold its own last batch; without
    this, each rank would evaluate a different model, and the reduced val loss, early stopping and the best
    weights (rank 0's) would judge a blend of them."""
    if run.accelerator.num_processes == 1:
        return
    trained = run.accelerator.unwrap_model(phase.step.model, keep_torch_compile=False)
    for module in {id(m): m for m in (trained, run.eval_model())}.values():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def default_callbacks(recipe: Recipe, options: RunOptions, accelerator: Accelerator, data: Data) -> list[Callback]:
    """The run's callbacks, in calling order: what the recipe and options ask for, then the user's, then the
    console and the loggers (so that they see every column the others add to an epoch's row)."""
    callbacks: list[Callback] = []
    if recipe.loss.distill.teacher:
        callbacks.append(Distillation.for_recipe(recipe, data.manifest, accelerator.device, options.cpu))
    if recipe.ema_decay:
        callbacks.append(Ema(recipe.ema_decay))
    callbacks.append(EarlyStopping(recipe.phases, has_val=data.val is not None))
    callbacks.append(NonFiniteCheck(check_grads=recipe.precision != "fp16"))
    if options.check_syncs:
        callbacks.append(SyncCheck(accelerator.device))
    if options.profile_steps:
        callbacks.append(StepProfiler(options.profile_steps))
    callbacks += [*options.callbacks, ProgressBar(), CsvLogger()]
    if recipe.tensorboard:
        callbacks.append(TensorBoardLogger())
    if recipe.wandb:
        callbacks.append(WandbLogger(to_dict(recipe)))
    return callbacks


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
    step = TrainStep(accelerator, model, optimizer, scheduler, recipe, teacher=run.teacher,
                     updates=run.step_updates)
    run.phase = Phase(index, config, step, [g["name"] for g in groups], trainable)
    return run.phase


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
    """Device, data, model, callbacks, the run folder, and where to start (fresh or a checkpoint); None when
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
    callbacks = CallbackList(default_callbacks(recipe, options, accelerator, data))  # they check the recipe too

    # the main process checks and makes the folder, the others take its path (a default name holds the time)
    run_dir_arg = checkpoint.run_folder(resume_path) if resume_path else options.run_dir
    fresh = options.resume == "auto" and not Path(run_dir_arg).exists()  # auto: nothing to resume yet
    made = new_run_dir(run_dir_arg, recipe.name, resume=bool(options.resume) and not fresh,
                       need_bytes=checkpoint.space_needed(model)) if accelerator.is_main_process else None
    run_dir = broadcast_object_list([made])[0]
    steps = len(data.train) if not recipe.max_steps_per_epoch else min(len(data.train), recipe.max_steps_per_epoch)
    run = Run(recipe, options, accelerator, data, info, model, run_dir,
              Progress(num_processes=accelerator.num_processes), steps, callbacks, StepTimer(accelerator.device))
    accelerator.register_for_checkpointing(callbacks)  # every callback's state travels in every checkpoint
    callbacks.on_fit_start(run)
    run.phase = resume(run, resume_path)
    if run.main:
        if run.resumed_from is None:  # also a --resume of a run killed before its first checkpoint
            write_text(run_dir / "config.toml", recipe_to_toml(recipe))
            if hasattr(model, "pretrained_report"):  # what pretrained loading copied, and what it left fresh
                write_json(run_dir / "pretrained.json", dataclasses.asdict(model.pretrained_report))
        environment = run_environment(recipe.seed, data.manifest, accelerator.num_processes, str(accelerator.device))
        write_json(run_dir / "environment.json", {**environment, "backends": backends})
        print(f"{model_summary(model)}\nrun folder: {run_dir}"
              + (f"\nresuming from {run.resumed_from}" if run.resumed_from else ""))
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
        run.progress, run.resumed_from = candidate, ckpt
        if boundary:  # the new phase starts with its own fresh optimizer and schedule, as in an uninterrupted run
            phase = start_phase(run, candidate.phase)
        if candidate.epoch == 0 and run.main:  # no best weights of this phase yet: any are an earlier phase's
            run.best_path.unlink(missing_ok=True)
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
    p.train_time = time.perf_counter() - run.train_start
    path = checkpoint.save(run.accelerator, run.ckpt_root, dataclasses.asdict(p))
    run.callbacks.on_checkpoint(run, path)


def sync_point(run: Run, sums: EpochSums) -> bool:
    """At a logging or checkpoint step: the epoch's sums over all ranks into `run.totals`, and whether any rank
    was asked to stop, in one all-reduce, so that every rank acts on the same values at the same step."""
    stacked = sums.stacked()
    stop = stacked.new_full((1,), float(run.options.stop.requested))
    values = run.accelerator.reduce(torch.cat([stacked, stop]), reduction="sum").tolist()
    run.totals = EpochTotals(*values[:-1])
    return values[-1] > 0


def train_one_epoch(run: Run, phase: Phase, epoch: int) -> None:
    """The epoch's steps, from the resume point; its totals over all ranks end up in `run.totals`."""
    p, step = run.progress, phase.step
    start_batch = p.batch if (phase.index, epoch) == (p.phase, p.epoch) else 0
    p.phase, p.epoch, p.batch = phase.index, epoch, start_batch
    # a mid-epoch checkpoint holds the sums over all processes: the main process carries them on
    carried = EpochTotals(**p.sums) if start_batch and run.main and p.sums else None
    sums = EpochSums(run.accelerator.device, carried)
    run.totals = EpochTotals()
    run.resumed_mid_epoch = start_batch > 0
    step.model.train()
    run.data.train.set_epoch(run.epoch_number, start_batch)
    run.callbacks.on_epoch_start(run)
    every = run.recipe.checkpoint_every_steps
    epoch_start = time.perf_counter()
    with closing_batches(run.data.train) as batches:
        for index in range(start_batch, run.steps_per_epoch):
            done = index + 1
            log_now = done % LOG_EVERY == 0 or done == run.steps_per_epoch  # the gradient norm is sampled here
            save_now = bool(every) and (p.global_step + 1) % every == 0 and done < run.steps_per_epoch
            steady = not (log_now or save_now) and index - start_batch >= WARMUP_STEPS
            with run.callbacks.watch_step(run, steady):
                run.timer.mark()
                with step.label("data"):
                    images, targets = next(batches)
                run.timer.mark()
                if run.first_step_at is None:
                    run.first_step_at = time.time()
                step(images, targets, sums, log=log_now)
                run.timer.mark()
            run.timer.count(targets.shape[0])
            p.global_step += 1
            if not (log_now or save_now):
                continue
            p.batch = done
            stop = sync_point(run, sums)
            run.callbacks.on_step_end(run)
            if (save_now or stop) and done < run.steps_per_epoch:  # a stop at the epoch's end waits for end_epoch
                save_checkpoint(run, phase, batch=done, sums=dataclasses.asdict(run.totals))
                if stop:
                    raise UserError(f"stopped by signal at step {p.global_step}; checkpoint written to "
                                    f"{run.ckpt_root}; continue with --run-dir {run.run_dir} --resume auto")
        run.epoch_seconds = time.perf_counter() - epoch_start  # before the close: FFCV's may wait for a batch
        run.epoch_times = run.timer.read()


def end_epoch(run: Run, phase: Phase, epoch: int) -> bool:
    """Evaluate, the epoch's row (callbacks read it, add to it, log it), checkpoint; True when the phase ends
    here (its last epoch, early stopping, or a callback's stop)."""
    p, totals, accelerator = run.progress, run.totals, run.accelerator
    row = {"epoch": run.epoch_number + 1, "phase": phase.config.name, "train_loss": totals.loss,
           "train_accuracy": totals.correct / totals.seen, "grad_norm": totals.grad_norm}
    share_buffers(run, phase)
    for name, loader in ([("val", run.data.val)] if run.data.val else []) + [("test", run.data.test)]:
        metrics, _, _ = evaluate(run.eval_model(), loader, run.recipe, accelerator, extra=run.options.metrics)
        run.callbacks.on_evaluate(run, name, metrics)
        row.update({f"{name}_{key}": value for key, value in metrics.items() if key != "count"})
    row.update({f"lr_{n}": lr for n, lr in zip(phase.group_names, phase.step.last_lrs)})
    seconds, times = run.epoch_seconds, run.epoch_times  # this process's: waiting for batches vs. in the step
    row.update(epoch_time_s=seconds, images_per_s="" if run.resumed_mid_epoch else totals.seen / seconds,
               peak_mem_mb=peak_memory_mb(accelerator.device),
               data_wait_s=times.data_wait_s, step_s=times.step_s, data_wait_fraction=times.data_wait_s / seconds,
               input_device_s="" if times.input_device_s is None else times.input_device_s,
               loader_images_per_s=times.loader_images_per_s or "")
    p.history.append(row)
    run.callbacks.on_epoch_end(run, row)
    stop_phase, stop_training, stopped = agree(accelerator, run.stop_phase, run.stop_training,
                                               run.options.stop.requested)
    run.stop_phase, run.stop_training = False, stop_training
    p.stopped_early |= stop_phase or stop_training
    ends_phase = stop_phase or stop_training or epoch + 1 == phase.config.epochs
    next_phase, next_epoch = (phase.index + 1, 0) if ends_phase else (phase.index, epoch + 1)
    every = run.recipe.checkpoint_every_epochs
    due = ends_phase or stopped or (every and run.epoch_number % every == 0)
    if due and next_phase < len(run.recipe.phases) and not stop_training:
        save_checkpoint(run, phase, phase=next_phase, epoch=next_epoch, batch=0, sums={})
    if stopped:
        raise UserError(f"stopped by signal after epoch {row['epoch']}; continue with --run-dir {run.run_dir} "
                        "--resume auto")
    return ends_phase


def start_phase(run: Run, index: int) -> Phase:
    """A new phase from its first epoch: its objects, and no best weights yet (those of an earlier phase do not
    decide the result)."""
    phase = prepare_phase(run, index)
    if run.main:
        run.best_path.unlink(missing_ok=True)
    run.callbacks.on_phase_start(run, phase)
    return phase


def finish(run: Run, phase: Phase) -> dict:
    """Test the deciding phase's best weights (or the last ones), export them, write reports and summary."""
    accelerator = run.accelerator
    run.callbacks.on_train_end(run)
    final = run.eval_model()
    # rank 0 wrote best.safetensors, maybe moments ago and maybe on a disk only its node sees: it reads the
    # file and every rank tests those weights (each reading it could mix models across ranks)
    best = load_file(run.best_path) if run.main and run.best_path.is_file() else None
    best = broadcast_object_list([best])[0]
    if best is not None:
        final.load_state_dict(best)
    share_buffers(run, phase)
    test, preds, labels = evaluate(final, run.data.test, run.recipe, accelerator, collect=True)
    wall = time.perf_counter() - run.train_start
    history = run.progress.history
    rates = [float(r["images_per_s"]) for r in history if r.get("images_per_s") not in ("", None)]
    # the last phase's whole epochs after the run's first (compile, warm-up; a head-only phase trains less)
    steady = [float(r["images_per_s"]) for r in history[1:] if r["phase"] == history[-1]["phase"]
              and r.get("images_per_s") not in ("", None)]
    waits = [(float(r["data_wait_fraction"]), int(r["epoch"])) for r in history
             if r.get("data_wait_fraction") not in ("", None)]
    worst_wait, worst_epoch = max(waits) if waits else (None, None)
    summary = {"recipe": run.recipe.name, "test_accuracy": test["accuracy"], "test_loss": test["loss"],
               "test_samples": test["count"], "epochs": len(history), "early_stopped": run.progress.stopped_early,
               "images_per_s": sum(rates) / len(rates) if rates else None,
               "steady_images_per_s": sum(steady) / len(steady) if steady else None, "wall_s": wall,
               "parameters": count_parameters(final), "processes": accelerator.num_processes,
               "first_step_at": run.first_step_at, "run_dir": str(run.run_dir), "plots": [],
               "worst_data_wait_fraction": worst_wait, "worst_data_wait_epoch": worst_epoch}
    if "top5_accuracy" in test:
        summary["test_top5_accuracy"] = test["top5_accuracy"]
    report = None
    if run.main:
        save_weights(final, run.run_dir / "model.safetensors")
        write_json(run.run_dir / "model.json", run.info)
        report = write_reports(run.run_dir, preds, labels, run.data.manifest["classes"])
    run.callbacks.on_fit_end(run, summary)
    if run.main:
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
    return summary if run.main else {}


def train(recipe: Recipe, options: RunOptions) -> dict:
    """Run a recipe to the end; the summary (on the main process; {} on the others)."""
    run = start(recipe, options)
    if run is None:
        return {}
    p = run.progress
    phase = run.phase
    for index in range(p.phase, len(recipe.phases)):
        if phase is None or phase.index != index:
            phase = start_phase(run, index)
        for epoch in range(p.epoch if index == p.phase else 0, phase.config.epochs):
            train_one_epoch(run, phase, epoch)
            if end_epoch(run, phase, epoch):
                break
        if run.stop_training:
            break
    return finish(run, phase)
