"""`python -m benchmarks.device.bundle`: cut large files into parts that fit the device tool's 64 MiB calls,
and put them back together on the other side, checked by sha256 at every step.

`pack` (here) splits every file of a payload folder into parts of at most --part-bytes, packs the parts
into numbered groups of at most --group-bytes (one group per `run` call, carried as `groupN/`), and writes
bundle.json (every file and part with its size, sha256 and group) into the output and into every group.
`stash` (there) copies one arrived group into the bundle folder after checking its parts; `unpack`
(there) checks every part, joins each file and checks it again. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from beton_trainer.common.errors import UserError, run_cli
from beton_trainer.common.files import atomic_path, sha256_file, write_text

PART_BYTES = 55_000_000  # at most 55 MB a part
GROUP_BYTES = 60 * 2**20  # at most 60 MiB a call, leaving room for the working tree in its 64 MiB
MANIFEST = "bundle.json"
PARTS = "parts"  # where `stash` collects the parts inside the bundle folder
FORMAT = 1
_CHUNK = 1 << 20


def part_name(name: str, index: int) -> str:
    return f"{name}.part{index:03d}"


def split_file(path: Path, out_dir: Path, limit: int) -> list[Path]:
    """Cut `path` into `out_dir/<name>.part000, ...`, each at most `limit` bytes (an empty file gives one
    empty part)."""
    if limit < 1:
        raise ValueError(f"part limit must be positive, got {limit}")
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = []
    with open(path, "rb") as src:
        while True:
            block = src.read(limit)
            if parts and not block:
                return parts
            part = out_dir / part_name(path.name, len(parts))
            part.write_bytes(block)
            parts.append(part)


def join_parts(parts: Sequence[Path], dest: Path) -> Path:
    """Concatenate `parts` in order into `dest`, atomically (a temporary file renamed at the end)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp, open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out, _CHUNK)
    return dest


def assign_groups(sizes: dict[str, int], limit: int) -> dict[str, int]:
    """Part name -> group number (1, 2, ...), first-fit decreasing so that no group exceeds `limit` bytes."""
    loads: list[int] = []
    groups = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        size = sizes[name]
        if size > limit:
            raise ValueError(f"part {name} has {size} bytes, more than a group's {limit}")
        for g, load in enumerate(loads):
            if load + size <= limit:
                loads[g] += size
                groups[name] = g + 1
                break
        else:
            loads.append(size)
            groups[name] = len(loads)
    return groups


def pack(payload: Path, out: Path, *, part_bytes: int = PART_BYTES, group_bytes: int = GROUP_BYTES,
         notes: dict[str, str] | None = None) -> dict:
    """Split every file under `payload` and deal the parts to `out/group1`, `out/group2`, ...; returns the
    manifest, also written to `out/bundle.json` and into every group. Old groups are removed first."""
    files = sorted(p for p in payload.rglob("*") if p.is_file())
    if not files:
        raise UserError(f"nothing to pack: {payload} holds no files; run benchmarks/device/build_bundle.sh")
    for old in out.glob("group*"):
        shutil.rmtree(old)
    staging = out / ".split"
    shutil.rmtree(staging, ignore_errors=True)
    entries = []
    for path in files:
        rel = path.relative_to(payload).as_posix()
        parts = split_file(path, staging / Path(rel).parent, part_bytes)
        entries.append({"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path),
                        "parts": [{"name": (Path(rel).parent / p.name).as_posix(),
                                   "size": p.stat().st_size, "sha256": sha256_file(p)} for p in parts]})
    groups = assign_groups({p["name"]: p["size"] for e in entries for p in e["parts"]}, group_bytes)
    for entry in entries:
        for part in entry["parts"]:
            part["group"] = groups[part["name"]]
            target = out / f"group{part['group']}" / part["name"]
            target.parent.mkdir(parents=True, exist_ok=True)
            (staging / part["name"]).replace(target)
    shutil.rmtree(staging)
    count = max(groups.values())
    manifest = {"format": FORMAT, "part_bytes": part_bytes, "group_bytes": group_bytes, "groups": count,
                "group_sizes": {str(g): sum(p["size"] for e in entries for p in e["parts"] if p["group"] == g)
                                for g in range(1, count + 1)},
                "notes": notes or {}, "files": entries}
    text = json.dumps(manifest, indent=1) + "\n"
    for target in [out, *(out / f"group{g}" for g in range(1, count + 1))]:
        write_text(target / MANIFEST, text)
    return manifest


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing; send a group folder made by benchmarks/device/build_bundle.sh "
                        "(carry .device-bundle/groupN) and stash it with install.sh --stash") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is unreadable ({exc}); send that group again") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path} is not a format {FORMAT} bundle manifest; rebuild with build_bundle.sh")
    return manifest


def _parts(manifest: dict) -> list[dict]:
    return [p for e in manifest["files"] for p in e["parts"]]


def _check_part(path: Path, part: dict) -> None:
    """A part that arrived intact, or a UserError naming it, its group and what to do."""
    which = f"part {part['name']} of group {part['group']}"
    resend = f"send group {part['group']} again (carry .device-bundle/group{part['group']})"
    if not path.is_file():
        raise UserError(f"{which} is missing from {path.parent}; {resend}")
    if path.stat().st_size != part["size"] or sha256_file(path) != part["sha256"]:
        raise UserError(f"{which} is corrupt (its size or sha256 differs from {MANIFEST}); {resend}")


def missing_groups(manifest: dict, bundle: Path) -> list[int]:
    """Groups with parts not yet stashed in `bundle`."""
    return sorted({p["group"] for p in _parts(manifest) if not (bundle / PARTS / p["name"]).is_file()})


def stash(group_dir: Path, bundle: Path) -> list[int]:
    """Check the parts of one arrived group folder and copy them into `bundle`; returns the groups still
    missing."""
    manifest = read_manifest(group_dir)
    known = bundle / MANIFEST
    if known.is_file() and read_manifest(bundle) != manifest:
        raise UserError(f"{group_dir} comes from another build than the parts already in {bundle}; "
                        f"remove {bundle} and send every group of one build")
    arrived = {p["group"] for p in _parts(manifest) if (group_dir / p["name"]).is_file()}
    if not arrived:
        raise UserError(f"{group_dir} holds none of the bundle's parts; carry a folder .device-bundle/groupN")
    bundle.mkdir(parents=True, exist_ok=True)
    for part in (p for p in _parts(manifest) if p["group"] in arrived):
        _check_part(group_dir / part["name"], part)
        target = bundle / PARTS / part["name"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(group_dir / part["name"], target)
    write_text(known, json.dumps(manifest, indent=1) + "\n")
    return missing_groups(manifest, bundle)


def unpack(bundle: Path, dest: Path) -> list[Path]:
    """Check every stashed part, join each file into `dest` and check it; files already there and intact
    are kept (so a second run is quick)."""
    manifest = read_manifest(bundle)
    missing = missing_groups(manifest, bundle)
    if missing:
        groups = ", ".join(map(str, missing))
        raise UserError(f"parts of group(s) {groups} of {manifest['groups']} have not arrived in {bundle}; "
                        "send each (carry .device-bundle/groupN), then install.sh --stash")
    out = []
    for entry in manifest["files"]:
        target = dest / entry["path"]
        if not (target.is_file() and target.stat().st_size == entry["size"]
                and sha256_file(target) == entry["sha256"]):
            paths = [bundle / PARTS / p["name"] for p in entry["parts"]]
            for path, part in zip(paths, entry["parts"]):
                _check_part(path, part)
            join_parts(paths, target)
            if sha256_file(target) != entry["sha256"]:
                target.unlink()
                raise UserError(f"{entry['path']} joined from intact parts has the wrong sha256; rebuild the "
                                "bundle with build_bundle.sh and send every group again")
        out.append(target)
    return out


def describe(manifest: dict) -> str:
    """A markdown table of the bundle: every file, its size, sha256 and the groups that carry it."""
    lines = ["| file | bytes | sha256 | parts (group) |", "|---|---:|---|---|"]
    for e in manifest["files"]:
        parts = ", ".join(f"{Path(p['name']).suffix[1:]} ({p['group']})" for p in e["parts"])
        lines.append(f"| {e['path']} | {e['size']:,} | {e['sha256'][:16]}… | {parts} |")
    sizes = ", ".join(f"group{g}: {size / 2**20:.1f} MiB" for g, size in manifest["group_sizes"].items())
    total = sum(e["size"] for e in manifest["files"])
    lines += ["", f"{len(manifest['files'])} files, {total / 2**20:.1f} MiB in {manifest['groups']} call "
              f"group(s) ({sizes})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.device.bundle",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="split a payload folder into groups (here)")
    p.add_argument("--payload", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--part-bytes", type=int, default=PART_BYTES)
    p.add_argument("--group-bytes", type=int, default=GROUP_BYTES)
    p.add_argument("--note", action="append", default=[], metavar="KEY=VALUE", help="recorded in bundle.json")
    s = sub.add_parser("stash", help="check arrived group folders and collect their parts (there)")
    s.add_argument("--bundle", type=Path, required=True)
    s.add_argument("groups", type=Path, nargs="+")
    u = sub.add_parser("unpack", help="check all parts, join and check every file (there)")
    u.add_argument("--bundle", type=Path, required=True)
    u.add_argument("--dest", type=Path, required=True)
    args = parser.parse_args(argv)

    if args.command == "pack":
        if args.part_bytes > args.group_bytes:
            raise UserError(f"--part-bytes {args.part_bytes} exceeds --group-bytes {args.group_bytes}; "
                            "a part must fit in one call")
        notes = dict(n.split("=", 1) for n in args.note)
        print(describe(pack(args.payload, args.out, part_bytes=args.part_bytes, group_bytes=args.group_bytes,
                            notes=notes)))
    elif args.command == "stash":
        missing: list[int] = []
        for group in args.groups:
            missing = stash(group, args.bundle)
            print(f"stashed {group} into {args.bundle}")
        left = ", ".join(map(str, missing))
        print(f"still to send: group(s) {left}" if missing else "all groups have arrived")
    else:
        for path in unpack(args.bundle, args.dest):
            print(f"ok {path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
