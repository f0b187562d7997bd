"""Train an image classifier from a recipe: `accelerate launch train.py --recipe c10_finetune`.

One loop, read top to bottom: recipe -> data on the device -> model -> for each phase (own
trainable modules, optimizer, parameter groups, schedule, early stopping) -> epochs of steps ->
evaluation, metrics, checkpoints -> test of the best model, reports, exported weights.
Runs as `python train.py` on one device or under `accelerate launch` / `torchrun` on N processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from common.errors import UserError, run_cli
from common.schema import to_dict
from models import build_model, count_parameters, model_summary
from pipelines import build_loader
from pipelines.base import LoaderOptions
from pipelines.dataset import load_manifest
from trainer import checkpoint
from trainer.config import PhaseConfig, Recipe, load_recipe, recipe_differences, recipe_to_toml
from trainer.optim import build_optimizer, build_scheduler, check_module_prefixes, param_groups, set_trainable
from trainer.report import plot_history, write_reports
from trainer.runlog import MetricsLog, environment, new_run_dir, write_json

DISTRIBUTED_ENV = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                   "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"}
LOG_EVERY = 50  # steps between progress-bar loss updates (each one syncs the device)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python train.py --recipe mnist_cnn --data data/mnist\n"
               "  accelerate launch train.py --recipe c10_finetune --set model.pretrained=false\n"
               "  python train.py --recipe c10_cnn --set data.batch_size=256 --set phases.0.epochs=5\n"
               "  python train.py --recipe mnist_cnn --run-dir runs/a --resume auto")
    parser.add_argument("--recipe", required=True, help="name in recipes/ (e.g. c10_finetune) or a .toml path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field (dotted keys, repeatable): --set data.batch_size=256")
    parser.add_argument("--data", help="converted dataset folder (holds manifest.json); overrides data.path")
    parser.add_argument("--loader", choices=["tensor", "ffcv", "dali"], help="overrides data.loader")
    parser.add_argument("--pretrained", metavar="PATH", help="torchvision-format state dict for model.pretrained")
    parser.add_argument("--run-dir", help="run folder (default runs/<recipe>-<timestamp>)")
    parser.add_argument("--resume", nargs="?", const="auto", metavar="PATH|auto",
                        help="continue from the newest good checkpoint of --run-dir (auto) or of PATH")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    parser.add_argument("--deterministic", action="store_true", help="deterministic torch algorithms")
    args = parser.parse_args(argv)
    if args.data:
        args.overrides.append(f"data.path={json.dumps(args.data)}")
    if args.loader:
        args.overrides.append(f"data.loader={args.loader}")
    if args.pretrained:
        args.overrides.append(f"model.pretrained={json.dumps(args.pretrained)}")
    if args.resume and args.resume != "auto" and args.run_dir:
        raise UserError("--resume PATH and --run-dir both name a run folder: pass one of them")
    return args


@dataclass
class Data:
    manifest: dict
    train: object
    val: object | None
    test: object


def build_data(recipe: Recipe, accelerator: Accelerator) -> Data:
    """The three loaders, each sharded over the processes and producing batches on the device."""
    if not recipe.data.path:
        raise UserError("no dataset: pass --data DIR (a folder made by `python -m convert`) or set data.path")
    manifest = load_manifest(recipe.data.path)
    if recipe.data.val_split and recipe.data.val_split not in manifest["splits"]:
        raise UserError(f"the recipe validates on split '{recipe.data.val_split}' but {recipe.data.path} has only "
                        f"{', '.join(manifest['splits'])}; convert again with --val-fraction 0.1")

    def loader(split: str, train: bool):
        return build_loader(recipe.data.loader, LoaderOptions(
            data_dir=Path(recipe.data.path), split=split, train=train, spec=recipe.augment,
            batch_size=recipe.data.batch_size if train else recipe.data.eval_batch_size,
            device=accelerator.device, seed=recipe.seed, rank=accelerator.process_index,
            world_size=accelerator.num_processes, num_workers=recipe.data.num_workers,
            label_smoothing=recipe.loss.label_smoothing, channels_last=recipe.channels_last))

    val = loader(recipe.data.val_split, False) if recipe.data.val_split else None
    return Data(manifest, loader("train", True), val, loader("test", False))


def model_spec(recipe: Recipe, manifest: dict) -> dict:
    """What it takes to rebuild the model without the recipe (written beside the exported weights)."""
    return {"name": recipe.model.name, "args": recipe.model.args, "num_classes": len(manifest["classes"]),
            "image_shape": manifest["image_shape"], "classes": manifest["classes"]}


def make_model(spec: dict, pretrained: bool | str = False) -> nn.Module:
    kwargs = dict(spec["args"])
    if pretrained:
        kwargs["pretrained"] = pretrained
    return build_model(spec["name"], num_classes=spec["num_classes"], image_shape=tuple(spec["image_shape"]),
                       **kwargs)


def train_teacher_first(recipe: Recipe, cpu: bool) -> None:
    """Run the teacher's recipe into `loss.distill.teacher` when that folder holds no finished run yet.

    One process trains it (a plain single-process train.py); under torchrun/accelerate the other ranks
    wait for its summary.json, so no collective can time out while the teacher trains.
    """
    kd = recipe.loss.distill
    folder = Path(kd.teacher)
    if not kd.teacher_recipe or (folder / "summary.json").is_file():
        return
    if int(os.environ.get("RANK", "0")) != 0:
        while not (folder / "summary.json").is_file():
            time.sleep(2)
        return
    print(f"training the teacher first: recipe {kd.teacher_recipe} -> {folder}", flush=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--recipe", kd.teacher_recipe,
               "--data", recipe.data.path, "--run-dir", str(folder)]
    command += ["--cpu"] if cpu else []
    command += ["--resume", "auto"] if (folder / "config.toml").is_file() else []  # an interrupted teacher
    single = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV and not k.startswith("TORCHELASTIC")}
    code = subprocess.run(command, env=single).returncode
    if code != 0:
        raise UserError(f"training the teacher with recipe '{kd.teacher_recipe}' failed (exit status {code}); "
                        f"see its output above, fix it, and run again (it resumes from {folder})")


def load_teacher(path: str, manifest: dict, device: torch.device) -> nn.Module:
    """A frozen teacher from a run folder (model.json + model.safetensors) of an earlier run."""
    folder = Path(path)
    folder = folder.parent if folder.suffix == ".safetensors" else folder
    if not (folder / "model.json").is_file() or not (folder / "model.safetensors").is_file():
        raise UserError(f"teacher {path} has no model.json and model.safetensors; point loss.distill.teacher "
                        "at the run folder of a finished training run")
    spec = json.loads((folder / "model.json").read_text())
    if spec["num_classes"] != len(manifest["classes"]):
        raise UserError(f"teacher {path} predicts {spec['num_classes']} classes but the data has "
                        f"{len(manifest['classes'])}; use a teacher trained on this dataset")
    if list(spec["image_shape"]) != list(manifest["image_shape"]):
        raise UserError(f"teacher {path} takes images of shape {spec['image_shape']} but the data has "
                        f"{manifest['image_shape']}; use a teacher trained on this dataset")
    teacher = make_model(spec)
    try:
        teacher.load_state_dict(load_file(folder / "model.safetensors"))
    except (RuntimeError, OSError) as exc:
        raise UserError(f"teacher weights in {folder} do not fit its model.json ({str(exc).splitlines()[0]}); "
                        "re-export the teacher run") from None
    return teacher.to(device).eval().requires_grad_(False)


def loss_terms(recipe: Recipe, logits: torch.Tensor, targets: torch.Tensor,
               teacher_logits: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Cross-entropy (hard or soft targets, label smoothing), plus the distillation terms."""
    if targets.dtype.is_floating_point:  # MixUp/CutMix soft targets already carry the smoothing
        hard = F.cross_entropy(logits, targets)
    else:
        hard = F.cross_entropy(logits, targets, label_smoothing=recipe.loss.label_smoothing)
    if teacher_logits is None:
        return {"loss": hard}
    kd = recipe.loss.distill
    t = kd.temperature
    soft = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean", log_target=True) * t * t
    return {"loss": kd.alpha * soft + (1 - kd.alpha) * hard, "kd_hard_loss": hard, "kd_soft_loss": soft}


@torch.no_grad()
def evaluate(model: nn.Module, loader, recipe: Recipe, accelerator: Accelerator,
             collect: bool = False) -> tuple[dict[str, float], torch.Tensor | None, torch.Tensor | None]:
    """Loss and accuracy over every sample of the split exactly once (sums reduced across ranks)."""
    model.eval()
    sums = torch.zeros(3, device=accelerator.device, dtype=torch.float64)  # loss sum, correct, count
    preds, labels = [], []
    loader.set_epoch(0)
    for images, targets in loader:
        with accelerator.autocast():
            logits = model(images)
            if recipe.tta_flip:
                logits = (logits + model(images.flip(3))) / 2
        logits = logits.float()
        loss = F.cross_entropy(logits, targets, label_smoothing=recipe.loss.label_smoothing, reduction="sum")
        pred = logits.argmax(1)
        sums += torch.stack([loss.double(), (pred == targets).sum().double(), sums.new_full((), targets.numel())])
        if collect:  # kept on the device; copied to the host once, after the loop
            preds.append(pred)
            labels.append(targets)
    sums = accelerator.reduce(sums, reduction="sum")
    loss_sum, correct, count = sums.tolist()
    metrics = {"loss": loss_sum / count, "accuracy": correct / count, "count": int(count)}
    if not collect:
        return metrics, None, None
    all_preds = torch.cat(gather_object([torch.cat(preds).cpu()]))
    all_labels = torch.cat(gather_object([torch.cat(labels).cpu()]))
    return metrics, all_preds, all_labels


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

    Checked only when the progress bar updates and before each checkpoint (each check syncs the
    device), so a checkpoint never holds weights trained past a non-finite step.
    """

    def __init__(self, check_grads: bool, ckpt_root: Path) -> None:
        self.check_grads = check_grads
        self.ckpt_root = ckpt_root
        self.last: tuple[float, int] | None = None  # (loss, step) at the last finite check

    def check(self, sums: torch.Tensor, step: int, lr: float) -> float:
        """The mean training loss of the epoch so far, from the running sums."""
        loss_sum, _, seen, grad_sum = sums.tolist()[:4]
        loss = loss_sum / max(seen, 1)
        what, value = ("gradient norm", grad_sum) if self.check_grads and math.isfinite(loss) else ("loss", loss)
        if math.isfinite(value):
            self.last = (loss, step)
            return loss
        last = f"last finite loss {self.last[0]:.4g} at step {self.last[1]}" if self.last else "no finite loss seen"
        raise UserError(f"the training {what} became {value} by step {step} (lr {lr:.3g}; {last}); lower the "
                        f"learning rate or enable grad_clip_norm; the last good checkpoint is kept in {self.ckpt_root}")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plain_model(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """The bare module under the DDP and torch.compile wrappers (for state dicts and EMA)."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def prepare_phase(accelerator: Accelerator, model: nn.Module, recipe: Recipe, phase: PhaseConfig,
                  steps_per_epoch: int):
    """Freeze/unfreeze, build the phase's optimizer and schedule, (re)wrap for DDP and compile."""
    model = plain_model(accelerator, model)
    accelerator.free_memory()
    trainable = set_trainable(model, phase.train_modules)
    groups = param_groups(model, phase)
    optimizer = build_optimizer(groups, phase.optimizer)
    scheduler = build_scheduler(optimizer, phase.schedule, epochs=phase.epochs, steps_per_epoch=steps_per_epoch)
    model, optimizer = accelerator.prepare(model, optimizer)
    if recipe.compile:  # recompiled per phase: freezing changes the backward graph
        model = torch.compile(model, mode=recipe.compile_mode)
    return model, optimizer, scheduler, [g["name"] for g in groups], trainable


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    resume_path = Path(args.resume) if args.resume and args.resume != "auto" else None
    run_dir_arg = checkpoint.run_folder(resume_path) if resume_path else args.run_dir
    if args.resume == "auto" and not args.run_dir:
        raise UserError("--resume auto needs --run-dir: the folder of the run to continue")
    accelerator = Accelerator(mixed_precision=recipe.precision, cpu=args.cpu,
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=10))])
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = not args.deterministic  # fixed shapes: let cuDNN pick its fastest kernels
    set_seed(recipe.seed)
    main_proc = accelerator.is_main_process
    if main_proc:  # the model builders report what they did (e.g. which pretrained tensors were loaded)
        logging.getLogger("models").addHandler(logging.StreamHandler(sys.stdout))
        logging.getLogger("models").setLevel(logging.INFO)

    data = build_data(recipe, accelerator)
    spec = model_spec(recipe, data.manifest)
    model = make_model(spec, recipe.model.pretrained)
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.to(accelerator.device)
    for i, phase in enumerate(recipe.phases):  # a recipe naming a missing module fails before anything is written
        check_module_prefixes(model, phase.train_modules, f"phases.{i}.train_modules")
        for group in phase.param_groups:
            check_module_prefixes(model, group.modules, f"phases.{i}.param_groups.modules")
    early_metrics = {p.early_stopping.metric for p in recipe.phases if p.early_stopping.metric}
    known = {f"{s}_{m}" for s in ("train", "test") + (("val",) if data.val else ()) for m in ("loss", "accuracy")}
    for metric in early_metrics - known:
        raise UserError(f"early stopping watches '{metric}', which this run does not compute; choose one of "
                        f"{', '.join(sorted(known))}" + ("" if data.val else " (or set data.val_split=val)"))
    if recipe.loss.distill.teacher:
        train_teacher_first(recipe, args.cpu)
    teacher = load_teacher(recipe.loss.distill.teacher, data.manifest, accelerator.device) \
        if recipe.loss.distill.teacher else None

    # one batch through the model before any file is written: a shape mismatch fails here, clearly
    data.test.set_epoch(0)
    probe = next(iter(data.test))[0][:2]
    try:
        with torch.no_grad():
            model.eval()(probe)
    except RuntimeError as exc:
        raise UserError(f"model '{recipe.model.name}' cannot take images of shape {tuple(probe.shape[1:])} from "
                        f"{recipe.data.path} ({str(exc).splitlines()[0]}); choose a model for this data") from None

    # the main process checks and makes the folder, the others take its path (a default name holds the time)
    made = new_run_dir(run_dir_arg, recipe.name, resume=bool(args.resume),
                       need_bytes=checkpoint.space_needed(model)) if main_proc else None
    run_dir = broadcast_object_list([made])[0]
    ckpt_root = run_dir / "checkpoints"
    ema = None
    if recipe.ema_decay:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(recipe.ema_decay), use_buffers=True)
        accelerator.register_for_checkpointing(ema)

    # where to start: a fresh run, or the newest checkpoint that loads
    progress = {"phase": 0, "epoch": 0, "batch": 0, "global_step": 0, "best": None, "bad_epochs": 0,
                "sums": [0.0] * 6, "rows": 0, "train_time": 0.0,
                "num_processes": accelerator.num_processes}
    resumed_from = None
    steps_per_epoch = len(data.train)
    if recipe.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, recipe.max_steps_per_epoch)
    saved_config = run_dir / "config.toml"
    if args.resume and saved_config.is_file():  # a checkpoint only fits the recipe that wrote it
        changed = recipe_differences(load_recipe(str(saved_config)), recipe)
        if changed:
            raise UserError(f"the recipe differs from the one {run_dir} was started with ({', '.join(changed[:5])}); "
                            f"resume with the same recipe and --set overrides (see {saved_config})")
    tried = checkpoint.candidates(resume_path or run_dir) if args.resume else []
    for ckpt in tried:
        candidate = checkpoint.read_progress(ckpt)  # None (with a warning) when its files are damaged
        if candidate is None:
            continue
        phase = recipe.phases[candidate["phase"]]
        model, optimizer, scheduler, group_names, _ = prepare_phase(
            accelerator, model, recipe, phase, steps_per_epoch)
        if checkpoint.load(accelerator, ckpt):
            if candidate["num_processes"] == accelerator.num_processes:
                scheduler.load_state_dict(candidate["scheduler"])
            else:  # each process's share of the data depends on their number: the epoch restarts
                candidate.update(batch=0, num_processes=accelerator.num_processes)
                checkpoint.fast_forward(scheduler, candidate["epoch"] * steps_per_epoch)
            progress, resumed_from = candidate, ckpt
            break
    if tried and resumed_from is None:
        raise UserError(f"no usable checkpoint in {run_dir}/checkpoints ({len(tried)} tried); "
                        "start a new run without --resume")
    if resumed_from is None and main_proc:  # also a --resume of a run killed before its first checkpoint
        (run_dir / "config.toml").write_text(recipe_to_toml(recipe))
    if main_proc:
        write_json(run_dir / "environment.json", environment(recipe.seed, data.manifest, accelerator.num_processes,
                                                             str(accelerator.device)))
        print(f"{model_summary(plain_model(accelerator, model))}\nrun folder: {run_dir}"
              + (f"\nresuming from {resumed_from}" if resumed_from else ""))
    log = MetricsLog(run_dir, tensorboard=recipe.tensorboard and main_proc, wandb=recipe.wandb and main_proc,
                     config=to_dict(recipe),
                     keep_rows=progress["rows"]) if main_proc else None
    stop = Stop()
    finite = FiniteWatch(check_grads=recipe.precision != "fp16", ckpt_root=ckpt_root)
    best_path = run_dir / "best.safetensors"
    eval_model = lambda: ema.module if ema is not None else model  # noqa: E731
    train_start = time.perf_counter() - progress["train_time"]
    epoch_counter = sum(p.epochs for p in recipe.phases[:progress["phase"]]) + progress["epoch"]
    finished_early = False

    for phase_index in range(progress["phase"], len(recipe.phases)):
        phase = recipe.phases[phase_index]
        if resumed_from is None or phase_index != progress["phase"]:
            model, optimizer, scheduler, group_names, trainable = prepare_phase(
                accelerator, model, recipe, phase, steps_per_epoch)
            if main_proc:
                print(f"phase {phase_index + 1}/{len(recipe.phases)} '{phase.name}': {phase.epochs} epochs, "
                      f"{trainable:,} trainable parameters, groups {', '.join(group_names)}")
        resumed_from = None
        start_epoch = progress["epoch"] if phase_index == progress["phase"] else 0
        for epoch in range(start_epoch, phase.epochs):
            model.train()
            start_batch = progress["batch"] if (phase_index, epoch) == (progress["phase"], progress["epoch"]) else 0
            # running sums on the device: loss, correct, samples, grad norm, kd soft, kd hard (read once per epoch)
            # a checkpoint holds the sums over all processes: the main process carries them on
            sums = torch.tensor(progress["sums"] if start_batch and main_proc else [0.0] * 6,
                                device=accelerator.device, dtype=torch.float64)
            data.train.set_epoch(epoch_counter, start_batch)
            epoch_start = time.perf_counter()
            bar = tqdm(total=steps_per_epoch, initial=start_batch, disable=not main_proc, leave=False,
                       desc=f"epoch {epoch_counter + 1}/{recipe.total_epochs}",
                       mininterval=0.1 if sys.stderr.isatty() else 30)
            step_in_epoch = start_batch
            for images, targets in data.train:
                if step_in_epoch >= steps_per_epoch:
                    break
                with accelerator.autocast():
                    logits = model(images)
                    with torch.no_grad() if teacher is not None else nullcontext():
                        teacher_logits = teacher(images) if teacher is not None else None
                    terms = loss_terms(recipe, logits.float(), targets,
                                       teacher_logits.float() if teacher_logits is not None else None)
                accelerator.backward(terms["loss"])
                params = [p for p in model.parameters() if p.grad is not None]
                if recipe.grad_clip_norm:
                    grad_norm = accelerator.clip_grad_norm_(params, recipe.grad_clip_norm)
                else:  # the norm is still logged; without clipping by norm there is nothing to rescale
                    if recipe.grad_clip_value:
                        accelerator.clip_grad_value_(params, recipe.grad_clip_value)
                    else:
                        accelerator.unscale_gradients()
                    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
                optimizer.step()
                step_lrs = scheduler.get_last_lr()  # the rates this step used (logged for the epoch's last step)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update_parameters(plain_model(accelerator, model))
                labels = targets.argmax(1) if targets.dtype.is_floating_point else targets
                sums += torch.stack([terms["loss"].detach().double() * labels.numel(),
                                     (logits.argmax(1) == labels).sum().double(),
                                     sums.new_full((), labels.numel()),  # a fill, not a host-to-device copy
                                     grad_norm.detach().double(),
                                     terms.get("kd_soft_loss", terms["loss"]).detach().double() * labels.numel(),
                                     terms.get("kd_hard_loss", terms["loss"]).detach().double() * labels.numel()])
                step_in_epoch += 1
                progress["global_step"] += 1
                bar.update(1)
                every = recipe.checkpoint_every_steps
                save_now = (every and progress["global_step"] % every == 0 or stop.requested) \
                    and step_in_epoch < steps_per_epoch
                if step_in_epoch % LOG_EVERY == 0 or save_now:
                    loss_now = finite.check(sums, progress["global_step"], scheduler.get_last_lr()[0])
                    bar.set_postfix(loss=f"{loss_now:.4f}")
                if save_now:
                    progress.update(phase=phase_index, epoch=epoch, batch=step_in_epoch,
                                    sums=accelerator.reduce(sums, reduction="sum").tolist(),
                                    scheduler=scheduler.state_dict(), rows=len(log.rows) if log else 0,
                                    train_time=time.perf_counter() - train_start)
                    checkpoint.save(accelerator, ckpt_root, progress)
                    if stop.requested:
                        raise UserError(f"stopped by signal at step {progress['global_step']}; checkpoint written "
                                        f"to {ckpt_root}; continue with --run-dir {run_dir} --resume auto")
            bar.close()
            epoch_time = time.perf_counter() - epoch_start
            sums = accelerator.reduce(sums, reduction="sum")
            finite.check(sums, progress["global_step"], scheduler.get_last_lr()[0])
            loss_sum, correct, seen, grad_sum, kd_soft, kd_hard = sums.tolist()
            row = {"epoch": epoch_counter + 1, "phase": phase.name, "train_loss": loss_sum / seen,
                   "train_accuracy": correct / seen, "grad_norm": grad_sum / accelerator.num_processes
                   / max(step_in_epoch, 1)}  # the sums include the steps before a resume
            if teacher is not None:
                row["kd_soft_loss"], row["kd_hard_loss"] = kd_soft / seen, kd_hard / seen
            for name in (["val"] if data.val else []) + ["test"]:
                metrics, _, _ = evaluate(eval_model(), data.val if name == "val" else data.test, recipe, accelerator)
                row[f"{name}_loss"], row[f"{name}_accuracy"] = metrics["loss"], metrics["accuracy"]
            row.update({f"lr_{n}": lr for n, lr in zip(group_names, step_lrs)})
            row.update(epoch_time_s=epoch_time, images_per_s=seen / epoch_time if start_batch == 0 else "",
                       peak_mem_mb=peak_memory_mb(accelerator.device))
            watch = phase.early_stopping
            improved = False
            if watch.metric:
                value, best = row[watch.metric], progress["best"]
                improved = best is None or (value < best if watch.mode == "min" else value > best)
                progress.update(best=value, bad_epochs=0) if improved else progress.update(
                    bad_epochs=progress["bad_epochs"] + 1)
                if improved and main_proc:
                    state = {k: v.contiguous() for k, v in plain_model(accelerator, eval_model()).state_dict().items()}
                    save_file(state, str(best_path) + ".tmp")
                    Path(str(best_path) + ".tmp").replace(best_path)
            if main_proc:
                log.log(row)
                shown = {k: f"{v:.4f}" for k, v in row.items() if k.endswith(("loss", "accuracy"))}
                print(f"epoch {row['epoch']}/{recipe.total_epochs} {phase.name}: "
                      + " ".join(f"{k} {v}" for k, v in shown.items()) + f" ({epoch_time:.1f}s)")
            epoch_counter += 1
            stop_phase = bool(watch.metric) and progress["bad_epochs"] >= watch.patience
            done_epoch = epoch + 1
            next_phase, next_epoch = (phase_index + 1, 0) if stop_phase or done_epoch == phase.epochs \
                else (phase_index, done_epoch)
            progress.update(phase=next_phase, epoch=next_epoch, batch=0, sums=[0.0] * 6,
                            scheduler=scheduler.state_dict(), rows=len(log.rows) if log else 0,
                            train_time=time.perf_counter() - train_start)
            if next_phase != phase_index:  # early stopping keeps the best of each phase
                progress.update(best=None, bad_epochs=0)
            if next_phase < len(recipe.phases):
                checkpoint.save(accelerator, ckpt_root, progress)
            if stop.requested:
                raise UserError(f"stopped by signal after epoch {row['epoch']}; continue with --run-dir {run_dir} "
                                "--resume auto")
            if stop_phase:
                if main_proc:
                    print(f"early stopping: {watch.metric} has not improved for {watch.patience} epochs")
                finished_early = True
                break

    # test the best model (when early stopping kept one) and export it
    final = plain_model(accelerator, eval_model())
    if best_path.is_file():
        final.load_state_dict(load_file(best_path))
    accelerator.wait_for_everyone()
    test, preds, labels = evaluate(eval_model(), data.test, recipe, accelerator, collect=True)
    wall = time.perf_counter() - train_start
    if main_proc:
        state = {k: v.contiguous() for k, v in final.state_dict().items()}
        save_file(state, str(run_dir / "model.safetensors"))
        write_json(run_dir / "model.json", spec)
        report = write_reports(run_dir, preds, labels, data.manifest["classes"])
        plots = plot_history(log.path, run_dir)
        log.close()
        images_per_s = [float(r["images_per_s"]) for r in log.rows if r.get("images_per_s") not in ("", None)]
        summary = {"recipe": recipe.name, "test_accuracy": test["accuracy"], "test_loss": test["loss"],
                   "test_samples": test["count"], "epochs": len(log.rows), "early_stopped": finished_early,
                   "images_per_s": sum(images_per_s) / len(images_per_s) if images_per_s else None,
                   "wall_s": wall, "parameters": count_parameters(final), "processes": accelerator.num_processes,
                   "run_dir": str(run_dir), "plots": [p.name for p in plots]}
        write_json(run_dir / "summary.json", summary)
        print(report)
        print(f"test accuracy {test['accuracy']:.4f}  test loss {test['loss']:.4f}  "
              f"({test['count']} images)  {summary['images_per_s'] or 0:,.0f} images/s  "
              f"{wall:.1f}s\nrun folder: {run_dir}")
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
