"""The recipe schema: every shipped recipe loads, overrides apply, mistakes are one-line UserErrors."""

from __future__ import annotations

import pytest

from beton_trainer.common.errors import UserError
from beton_trainer.trainer.config import RECIPES_DIR, apply_override, load_recipe, recipe_to_toml

ALL = sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


@pytest.mark.parametrize("name", ALL)
def test_every_recipe_loads_and_round_trips(name, tmp_path):
    recipe = load_recipe(name)
    path = tmp_path / "resolved.toml"
    path.write_text(recipe_to_toml(recipe))
    assert load_recipe(str(path)) == recipe


def test_smoke_twins_exist_for_every_recipe():
    bases = [n for n in ALL if not n.endswith("_smoke") and n != "c100_scratch_sgd"]
    assert set(f"{n}_smoke" for n in bases) <= set(ALL)


def test_seed_000_numbers():
    r = load_recipe("c10_finetune")
    warm, fine = r.phases
    assert (warm.epochs, warm.train_modules, warm.optimizer.name, warm.optimizer.lr) == (8, ["fc"], "sgd", 0.01)
    assert (warm.optimizer.momentum, warm.optimizer.weight_decay, warm.schedule.name) == (0.9, 5e-4, "constant")
    assert (fine.epochs, fine.optimizer.lr, fine.optimizer.weight_decay) == (100, 1e-3, 5e-4)
    assert fine.optimizer.momentum == 0.9
    assert [(g.modules, g.lr) for g in fine.param_groups] == [(["fc"], 0.01)]
    assert (fine.schedule.name, fine.schedule.t_max, fine.schedule.eta_min) == ("cosine", 100, 1e-6)
    assert (fine.early_stopping.metric, fine.early_stopping.patience) == ("val_loss", 15)
    assert (r.loss.label_smoothing, r.grad_clip_norm, r.model.args["dropout"]) == (0.1, 1.0, 0.2)
    assert (r.augment.crop.padding, r.augment.flip.p) == (4, 0.5)
    assert (r.augment.erase.p, r.augment.erase.scale) == (0.25, (0.02, 0.1))
    assert r.model.name == "resnet34_cifar" and r.model.pretrained is True


def test_seed_003_numbers():
    r = load_recipe("c100_scratch")
    (p,) = r.phases
    assert (r.data.batch_size, p.epochs, p.optimizer.name, p.optimizer.lr, p.optimizer.weight_decay) == (
        400, 120, "adam", 0.01, 1e-4)
    assert (r.grad_clip_value, p.schedule.name, r.precision) == (0.1, "onecycle", "fp16")
    j = r.augment.jitter
    assert (j.brightness, j.contrast, j.saturation, j.hue) == (0.1, 0.1, 0.1, 0.02)
    assert r.augment.mix.mixup_alpha > 0 and r.augment.mix.cutmix_alpha > 0 and r.loss.label_smoothing > 0


def test_ffcv_imagenet_numbers():
    """libffcv/ffcv-imagenet's rn18_16_epochs (one GPU, batch 1024, lr 0.5) and rn50_88_epochs (8 GPUs of batch
    512, lr 1.7) configs; its script sets the lr as given, without scaling it by the batch size."""
    for name, arch, epochs, batch, lr, wd, ramp in [
            ("imagenet_rn18_16", "resnet18", 16, 1024, 0.5, 5e-5, (11, 13)),
            ("imagenet_rn50_88", "resnet50", 88, 512, 1.7, 1e-4, (65, 76))]:
        r = load_recipe(name)
        (p,) = r.phases
        d = r.data
        assert (r.model.name, r.model.args, r.model.pretrained) == (arch, {"blurpool": True}, False)
        assert (p.epochs, d.batch_size, d.loader) == (epochs, batch, "ffcv")
        o = p.optimizer
        assert (o.name, o.lr, o.momentum, o.weight_decay, o.no_decay_norm_bias) == ("sgd", lr, 0.9, wd, True)
        assert (p.schedule.name, p.schedule.peak_epoch, r.loss.label_smoothing) == ("triangular", 2.0, 0.1)
        assert (d.min_res, d.max_res, (d.start_ramp, d.end_ramp), d.eval_resolution) == (160, 192, ramp, 256)
        assert r.tta_flip and r.augment.flip.p == 0.5 and r.augment.enabled() == ["flip"]


def test_hymenoptera_finetune_numbers():
    """PyTorch's transfer-learning tutorial, from scratch by default."""
    r = load_recipe("hymenoptera_finetune")
    (p,) = r.phases
    assert (r.model.name, r.model.pretrained) == ("resnet18", False)
    assert (r.data.resolution, r.data.eval_resolution, r.data.loader) == (224, 224, "photo")
    assert (r.data.batch_size, r.augment.enabled(), r.augment.flip.p) == (4, ["flip"], 0.5)
    assert (p.epochs, p.optimizer.name, p.optimizer.lr, p.optimizer.momentum) == (25, "sgd", 1e-3, 0.9)
    assert (p.schedule.name, p.schedule.step_size, p.schedule.gamma) == ("step", 7, 0.1)
    r = load_recipe("hymenoptera_finetune", ["model.pretrained=\"weights/resnet18.pth\""])
    assert r.model.pretrained == "weights/resnet18.pth"


def test_photo_smoke_twins_run_in_the_core_and_the_imagenet_recipes_keep_ffcv():
    """The photo recipes' smoke twins (and hymenoptera_finetune) read with the core's photo loader, so CI's core-only
    environment trains them; the ImageNet recipes keep ffcv-imagenet's own loader, whose figures they reproduce."""
    for name in ("hymenoptera_finetune_smoke", "imagenet_rn18_16_smoke", "imagenet_rn50_88_smoke"):
        assert load_recipe(name).data.loader == "photo", name
    assert {load_recipe(name).data.loader for name in ("imagenet_rn18_16", "imagenet_rn50_88")} == {"ffcv"}


def test_resolution_ramp_as_ffcv_imagenet():
    """ffcv-imagenet's get_resolution: min_res through start_ramp, max_res from end_ramp, between them the
    linear interpolation rounded to a multiple of 32."""
    res = load_recipe("imagenet_rn18_16").data.resolutions()
    assert [res.for_epoch(e) for e in range(16)] == [160] * 12 + [192] * 4  # epoch 12: 176 / 32 = 5.5 -> 6
    ramp = load_recipe("c10_cnn", ["data.min_res=128", "data.max_res=256", "data.start_ramp=2",
                                   "data.end_ramp=6"]).data.resolutions()
    assert [ramp.for_epoch(e) for e in range(8)] == [128, 128, 128, 160, 192, 224, 256, 256]
    fixed = load_recipe("hymenoptera_finetune").data.resolutions()
    assert {fixed.for_epoch(e) for e in range(25)} == {224} and fixed.eval == 224


def test_overrides_dotted_indexed_and_suffix():
    r = load_recipe("c10_finetune", ["data.batch_size=256", "phases.1.epochs=3", "pretrained=false",
                                     "augment.erase.scale=[0.1, 0.2]"])
    assert (r.data.batch_size, r.phases[1].epochs, r.model.pretrained) == (256, 3, False)
    assert r.augment.erase.scale == (0.1, 0.2)


@pytest.mark.parametrize("override, fragment", [  # the other recipe mistakes are in test_bad_input's catalogue
    ("data.resolution=4", "'data.resolution' must be >= 8"),
    ("data.max_res=100", "'data.min_res' must be >= 8"),
    ("data.min_res=200", "'data.max_res' must be >= 200"),
    ("phases.0.schedule.peak_epoch=-1", "'phases[0].schedule.peak_epoch' must be >= 0"),
    ("max_eval_batches=-1", "'max_eval_batches' must be >= 0"),
])
def test_bad_overrides_are_clear(override, fragment):
    with pytest.raises(UserError, match=None) as info:
        load_recipe("c10_finetune", [override])
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_extends_rejects_stray_keys(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('extends = "mnist_cnn"\nseed = 3\n')
    with pytest.raises(UserError, match="move seed into 'set'"):
        load_recipe(str(path))


def test_apply_override_parses_values():
    data: dict = {}
    apply_override(data, "a.b=[1, 2]")
    apply_override(data, 'a.c="x"')
    apply_override(data, "a.d=1e-3")
    assert data == {"a": {"b": [1, 2], "c": "x", "d": 1e-3}}
