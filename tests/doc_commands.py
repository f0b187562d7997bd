"""The commands shown in the documentation, checked against the real parsers: used by tests/test_docs.py (README.md
and docs/) and tests/test_device_bundle.py (benchmarks/device/README.md).

`markdown_commands(path)` splits the fenced ```bash blocks of a Markdown file into simple commands;
`check_command(words)` runs one through the parser of the program it names and raises `CommandError` when that
parser stops (an unknown flag, a bad choice) or a file it names is missing. Checked: `python -m MODULE` (any
python: `.venv/bin/python`, `python3`), `python train.py`, `beton-train`, `beton-convert`, `beton-studies` (with or
without `.venv/bin/`), a launcher running train.py (`accelerate launch ... train.py`, `torchrun ... train.py`),
`bash SCRIPT --flags` and `python -m pytest tests/...`. Anything else is left alone.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKOUT_MODULES = {"convert": "beton_trainer.convert", "studies": "beton_trainer.studies"}  # `python -m convert`
COMMANDS = {"beton-train": "train.py", "beton-convert": "convert", "beton-studies": "studies"}
LAUNCHERS = ("accelerate", "torchrun")


class CommandError(AssertionError):
    """A documented command that its parser (or the files it names) would refuse."""


def markdown_commands(path: Path, text: str | None = None) -> list[list[str]]:
    """Every simple command in the fenced bash blocks of a Markdown file: lines ending in `\\` joined, split at ;,
    &&, || and | (outside quotes), environment assignments, redirections and `source`/`export`/`set`/`cd` dropped,
    $VARIABLES left as words."""
    commands: list[list[str]] = []
    text = path.read_text() if text is None else text
    for block in re.findall(r"^ *```bash\n(.*?)^ *```", text, flags=re.S | re.M):
        for line in re.sub(r"\\\n", " ", block).splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.commenters, lexer.wordchars = "#", lexer.wordchars + "$:{}%,@+[]"
            words: list[str] = []
            tokens = list(lexer) + [";"]
            skip = False
            for token in tokens:
                if skip:
                    skip = False
                elif token in (";", "&&", "||", "|", "&"):
                    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                        words = words[1:]
                    if words and words[0] not in ("source", "export", "set", "cd"):
                        commands.append(words)
                    words = []
                elif set(token) <= set("<>&"):  # a redirection: drop it, its target and an fd number before it
                    skip = True
                    if words and words[-1].isdigit():
                        words.pop()
                else:
                    words.append(token)
    return commands


class _Parsed(Exception):
    pass


@contextlib.contextmanager
def _stop_after_parsing():
    """ArgumentParser.parse_args parses, then raises _Parsed: a module's main(argv) runs only as far as its parser."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original


def parse_module_args(module_name: str, args: list[str]) -> None:
    """Parse `args` with the parser of `python -m module_name` (its build_parser, parse_args or main, or its cli's)."""
    module = importlib.import_module(CHECKOUT_MODULES.get(module_name, module_name))
    if not any(hasattr(module, name) for name in ("build_parser", "parse_args", "main")):
        module = importlib.import_module(f"{module.__name__}.cli")
    try:
        with _stop_after_parsing(), contextlib.redirect_stdout(io.StringIO()):
            if hasattr(module, "build_parser"):
                module.build_parser().parse_args(args)
            elif hasattr(module, "parse_args"):
                module.parse_args(args)
            else:
                module.main(args)
    except _Parsed:
        return
    except SystemExit as exc:
        if exc.code in (0, None):  # --help
            return
        raise CommandError(f"`python -m {module_name} {shlex.join(args)}` stops at its parser "
                           f"(exit status {exc.code})") from None
    raise CommandError(f"python -m {module_name}: found no parser to check {args}")


def parse_train_args(args: list[str]) -> None:
    from beton_trainer.trainer.cli import parse_args

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            parse_args(args)
    except SystemExit as exc:
        if exc.code in (0, None):  # --help
            return
        raise CommandError(f"`train.py {shlex.join(args)}` stops at its parser (exit status {exc.code})") from None


def check_command(words: list[str]) -> bool:
    """Check one command; True when it was one this module checks, False when left alone."""
    program, args = words[0], words[1:]
    name = Path(program).name
    if name in COMMANDS:
        target = COMMANDS[name]
        if target == "train.py":
            parse_train_args(args)
        else:
            parse_module_args(target, args)
    elif re.fullmatch(r"python(3(\.\d+)?)?", name) and args[:1] == ["-m"] and len(args) > 1:
        module, args = args[1], args[2:]
        if module == "pytest":
            missing = [a for a in args if a.startswith("tests/") and not (ROOT / a.split("::")[0]).is_file()]
            if missing:
                raise CommandError(f"{shlex.join(words)}: no such test file {missing}")
        else:
            parse_module_args(module, args)
    elif re.fullmatch(r"python(3(\.\d+)?)?", name) and args[:1] == ["train.py"]:
        parse_train_args(args[1:])
    elif name in LAUNCHERS and "train.py" in args:
        parse_train_args(args[args.index("train.py") + 1:])
    elif any(a.endswith(".sbatch") for a in args):  # `sbatch [options] launch/slurm.sbatch ARGS`: ARGS go to train.py
        script = next(a for a in args if a.endswith(".sbatch"))
        if not (ROOT / script).is_file():
            raise CommandError(f"{shlex.join(words)}: no such script {script}")
        parse_train_args(args[args.index(script) + 1:])
    elif name == "bash" and args and (ROOT / args[0]).is_file():
        script = (ROOT / args[0]).read_text()
        for flag in (a for a in args[1:] if a.startswith("--")):
            if f"{flag})" not in script and f"{flag}|" not in script:
                raise CommandError(f"{args[0]} has no option {flag}")
    else:
        return False
    return True
