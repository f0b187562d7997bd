"""What a run on several processes or nodes needs beyond Accelerate: the same data on every rank, the
launcher's mixed-precision setting carried into the recipe, and the environment of elastic torchrun jobs.

Each node may hold its own copy of the converted data at the same path; a stale or different copy
would train silently on other samples, so every rank hashes the dataset it opened and compares with
rank 0 before training starts. The hash reads every record, so each node remembers it per file state
(`node_identity`): the next start, and every elastic restart, reads no records.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import gather_object

from beton_trainer.common.errors import UserError
from beton_trainer.common.files import write_json
from beton_trainer.format.dataset import MANIFEST, dataset_identity

__all__ = ["ELASTIC_ENV", "check_same_data", "identity_cache", "isolated_state", "launcher_overrides",
           "node_identity", "reset_accelerate_state"]

KEPT_IDENTITIES = 100  # entries of the node's identity cache (one per dataset version seen)

# torchrun shares its rendezvous TCPStore with the workers by default; a worker group restarted after a
# lost worker then reads the previous group's gloo/NCCL addresses from it and cannot connect (pytorch
# issues 135712 and 167288; reproduced here with torch 2.14 and gloo). Elastic jobs turn the sharing off.
ELASTIC_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def identity_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "beton-trainer" / "identities.json"


def _cached_identities() -> dict[str, str]:
    try:
        cache = json.loads(identity_cache().read_text())
    except (OSError, ValueError):  # none yet, or garbled: start again
        return {}
    return {k: v for k, v in cache.items() if isinstance(v, str)} if isinstance(cache, dict) else {}


def node_identity(data_dir: str | Path) -> str:
    """`dataset_identity`, remembered in the user's cache under the state (path, size, modification time) of
    the manifest and every .beton: a file that changes is hashed again; an unwritable cache only costs time."""
    folder = Path(data_dir).resolve()
    files = [p for p in (folder / MANIFEST, *sorted(folder.glob("*.beton"))) if p.is_file()]
    state = json.dumps([[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files])
    key = hashlib.sha256(state.encode()).hexdigest()
    cache = _cached_identities()
    if key not in cache:
        cache[key] = dataset_identity(data_dir)  # a UserError (missing, corrupt file) propagates; nothing is kept
        try:
            identity_cache().parent.mkdir(parents=True, exist_ok=True)
            write_json(identity_cache(), dict(list(cache.items())[-KEPT_IDENTITIES:]))
        except OSError:
            pass
    return cache[key]


def check_same_data(accelerator: Accelerator, data_dir: str) -> None:
    """Raise the same UserError on every rank when any rank's dataset at `data_dir` differs from rank 0's.

    A rank that cannot open its copy (missing, truncated) reports its error instead of stopping alone,
    so no other rank is left waiting in a collective. A single process has nothing to compare.
    """
    if accelerator.num_processes == 1:
        return
    try:
        identity, error = node_identity(data_dir), None
    except UserError as exc:
        identity, error = None, str(exc)
    ranks = gather_object([(accelerator.process_index, socket.gethostname(), identity, error)])
    failed = [(rank, host, err) for rank, host, _, err in ranks if err]
    if failed:
        rank, host, err = failed[0]
        if len(failed) == len(ranks) and len({err for *_, err in failed}) == 1:
            raise UserError(err)  # the same problem everywhere: say it once, as a single process would
        raise UserError(f"rank {rank} on host {host}: {err}" + _more(failed))
    first = ranks[0]
    differ = [(rank, host, identity) for rank, host, identity, _ in ranks if identity != first[2]]
    if differ:
        rank, host, identity = differ[0]
        raise UserError(f"rank {rank} on host {host} reads a different dataset at {data_dir} than rank 0 on host "
                        f"{first[1]} (records checksum {identity[:12]} vs {first[2][:12]})" + _more(differ)
                        + f"; give every node the same conversion at {data_dir} (copy rank 0's, or convert again "
                        "with the same command)")


def _more(found: list[tuple]) -> str:
    """' (and ranks 3, 5 on host b)' for the ranks after the first one named."""
    if len(found) < 2:
        return ""
    hosts = sorted({host for _, host, _ in found[1:]})
    return f" (and rank(s) {', '.join(str(r) for r, *_ in found[1:])} on host(s) {', '.join(hosts)})"


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide state, so that the next Accelerator may use another precision or
    device. The one place this project touches Accelerate's private state: it has no public reset."""
    AcceleratorState._reset_state(True)


@contextmanager
def isolated_state() -> Iterator[None]:
    """Undo what a run leaves process-wide, even when it fails: Accelerate's singleton state (else the next
    Accelerator could not change precision or device) and a process group it started. For the Python API,
    benchmarks that build one Accelerator per setting, and tests that train in-process."""
    had_group = dist.is_available() and dist.is_initialized()
    try:
        yield
    finally:
        reset_accelerate_state()
        if not had_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def launcher_overrides() -> list[str]:
    """Recipe overrides implied by the launcher: `accelerate launch` with a bf16/fp16 config (or
    --mixed_precision) sets ACCELERATE_MIXED_PRECISION, which an explicit Accelerator argument would
    otherwise ignore. Put before the user's --set, so those still win; recorded in the run's config.toml."""
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    return [f"precision={precision}"] if precision in ("fp16", "bf16") else []
