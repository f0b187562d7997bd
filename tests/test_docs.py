"""The documentation is checked like code: the site builds with warnings as errors (broken links and anchors
included), every documented command gets past its real parser, the generated pages match the code, and the
recipe-key reference names every field of every recipe table. Each check is also shown to fail on a planted
mistake."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
import yaml

from tests.doc_commands import CommandError, check_command, markdown_commands

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))
import gen  # noqa: E402  (docs/gen.py: the generated pages)

sys.path.remove(str(ROOT / "docs"))

DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          cwd=config.parent, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1"})


def test_the_site_builds_with_warnings_as_errors(tmp_path):
    proc = _mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "WARNING" not in proc.stderr
    for page in ("index.html", "recipes/keys/index.html", "api/index.html", "loaders/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "fit" in api and "load_run" in api  # mkdocstrings rendered the docstrings


def _small_site(tmp_path: Path, index: str) -> Path:
    """A site with this project's mkdocs.yml settings (validation, strict, extensions) but only two pages."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    config.update(docs_dir="docs", plugins=["search"])
    config.pop("nav")
    config.pop("exclude_docs")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text(index)
    (tmp_path / "docs" / "other.md").write_text("# Other\n\n## A section\n\ntext\n")
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    return tmp_path / "mkdocs.yml"


@pytest.mark.parametrize("link, fails", [
    ("[fine](other.md#a-section)", False),
    ("[a page that does not exist](missing.md)", True),
    ("[an anchor that does not exist](other.md#no-such-section)", True),
    ("[an anchor on this page that does not exist](#nowhere)", True),
])
def test_a_link_that_points_nowhere_fails_the_build(tmp_path, link, fails):
    proc = _mkdocs_build(_small_site(tmp_path, f"# Home\n\nSee {link}.\n"), tmp_path / "site")
    assert (proc.returncode != 0) == fails, proc.stderr[-2000:]
    if fails:
        target = re.search(r"\(([^)]*)\)", link).group(1)
        assert target.split("#")[-1] in proc.stderr  # the warning names what is missing


def test_every_link_in_the_readme_resolves():
    text = (ROOT / "README.md").read_text()
    links = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"\w+://|#", t)]
    assert links, "the README links into the docs"
    missing = [t for t in links if not (ROOT / t.split("#")[0]).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_every_documented_command_parses(monkeypatch):
    """Each command in a ```bash block of the README or the docs that names a project command, `python -m`,
    `python train.py` or a launcher of train.py goes through its real parser: an unknown flag fails here."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # parsers whose defaults look for CUDA
    checked: list[str] = []
    failures: list[str] = []
    for path in DOC_FILES:
        for words in markdown_commands(path):
            try:
                if check_command(words):
                    checked.append(" ".join(words))
            except CommandError as exc:
                failures.append(f"{path.relative_to(ROOT)}: {exc}")
    assert not failures, "\n".join(failures)
    programs = " ".join(checked)
    for expected in ("train.py", "beton-convert", "beton-studies", "-m benchmarks.loaders", "accelerate launch",
                     "torchrun", "slurm.sbatch"):
        assert expected in programs, f"no documented command checked for {expected}"
    assert len(checked) >= 40, len(checked)


PLANTED = """
Some text.

```bash
.venv/bin/python train.py --recipe mnist_cnn --data data/mnist --cpu      # fine
{command}
```
"""


@pytest.mark.parametrize("command", [
    ".venv/bin/python train.py --recipe mnist_cnn --no-such-flag",
    "beton-train --recipe mnist_cnn --loader nosuchbackend",
    "accelerate launch --multi_gpu train.py --recipe c10_cnn --epochs 3",
    ".venv/bin/beton-convert mnist --src a --out b --no-such-flag",
    "python -m convert mnist --src a --out b --encode png",
    "beton-studies depth_mlp --scale huge",
    "python -m benchmarks.loaders --no-such-flag",
    "python -m benchmarks.startup --no-such-flag",  # a module whose parser lives inside main()
    "DATA_ROOT=x python -m benchmarks.smoke_times --data-root x \\\n    --no-such-flag",  # a continued line
])
def test_a_documented_command_with_a_flag_that_does_not_exist_fails(monkeypatch, command):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    commands = markdown_commands(Path("planted.md"), PLANTED.format(command=command))
    assert len(commands) == 2
    assert check_command(commands[0])
    with pytest.raises(CommandError, match="stops at its parser"):
        check_command(commands[1])


def test_the_generated_pages_are_current():
    stale = [rel for rel, build in gen.PAGES.items() if (ROOT / "docs" / rel).read_text() != build()]
    assert not stale, f"stale generated pages {stale}: run `python docs/gen.py` and commit them"


def _recipe_keys(cls: type, prefix: str = "") -> list[str]:
    """Every field of every table under cls, as its dotted key (phases.N.optimizer.lr), walked with dataclasses
    independently of docs/gen.py."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = typing.get_args(hint)
        if dataclasses.is_dataclass(hint):
            keys += _recipe_keys(hint, f"{prefix}{f.name}.")
        elif typing.get_origin(hint) is list and args and dataclasses.is_dataclass(args[0]):
            keys += _recipe_keys(args[0], f"{prefix}{f.name}.N.")
        else:
            keys.append(prefix + f.name)
    return keys


def _undocumented(cls: type, reference: str) -> list[str]:
    return [key for key in _recipe_keys(cls) if f"| `{key}` |" not in reference]


def test_the_key_reference_covers_every_field_of_every_recipe_table():
    from beton_trainer.pipelines.augment import AugmentSpec
    from beton_trainer.trainer.config import PhaseConfig, Recipe

    DataConfig = typing.get_type_hints(Recipe)["data"]  # the [data] table's class, reached through Recipe
    reference = (ROOT / "docs" / "recipes" / "keys.md").read_text()
    keys = _recipe_keys(Recipe)
    assert not _undocumented(Recipe, reference)
    tables = {k.rsplit(".", 1)[0] for k in keys if "." in k}
    assert {"data", "model", "augment.crop", "augment.mix", "loss", "loss.distill", "phases.N",
            "phases.N.optimizer", "phases.N.param_groups.N", "phases.N.schedule", "phases.N.early_stopping"} <= tables
    counted = {"data": DataConfig, "phases.N": PhaseConfig, "augment": AugmentSpec}
    for prefix, cls in counted.items():
        assert {f"{prefix}.{k}" for k in _recipe_keys(cls)} <= set(keys)
    rows = re.findall(r"^\| `([\w.]+)` \|", reference, flags=re.M)
    assert sorted(rows) == sorted(keys)  # nothing more, nothing twice


def test_a_recipe_field_missing_from_the_reference_is_found():
    """Planted: a Recipe whose [data] table has one more field than the committed reference knows."""
    from beton_trainer.trainer.config import Recipe

    DataConfig = typing.get_type_hints(Recipe)["data"]
    reference = (ROOT / "docs" / "recipes" / "keys.md").read_text()
    planted_data = dataclasses.make_dataclass("PlantedData", [("planted_key", str, dataclasses.field(default="x"))],
                                              bases=(DataConfig,))
    planted = dataclasses.make_dataclass("PlantedRecipe", [("data", planted_data,
                                                            dataclasses.field(default_factory=planted_data))],
                                         bases=(Recipe,))
    assert _undocumented(planted, reference) == ["data.planted_key"]
