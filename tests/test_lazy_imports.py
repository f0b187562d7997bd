"""What a process imports: the optional backends and the heavy tools only where they are used (issue 24).

Each case runs in a fresh interpreter (this one has imported everything by now) and lists which of the watched
modules it ended up with. Timings are benchmarks/startup.py's business, not a test's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WATCHED = ("torch", "ffcv", "numba", "nvidia.dali", "cv2", "timm", "matplotlib", "tensorboard", "wandb")
REPORT = f"import sys, json; print(json.dumps(sorted(m for m in {WATCHED!r} if m in sys.modules)))"


def imported_by(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\n{REPORT}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_converting_and_reading_a_beton_import_neither_torch_nor_ffcv(tiny_rgb_data: Path) -> None:
    code = (f"import convert, convert.build\nfrom format.dataset import open_split\n"
            f"open_split({str(tiny_rgb_data)!r}, 'train')")
    assert imported_by(code) == []


def test_a_tensor_backend_run_imports_no_optional_backend_nor_timm(mnist_data: Path,
                                                                     tmp_path: Path) -> None:
    """A whole train.py run on the tensor backend, TensorBoard off: torch and, for the end-of-run plots,
    matplotlib; never ffcv, numba, DALI, OpenCV or timm."""
    argv = ["train.py", "--recipe", "mnist_mlp_smoke", "--data", str(mnist_data), "--loader", "tensor", "--cpu",
            "--run-dir", str(tmp_path / "run"), "--set", "tensorboard=false"]
    code = ("import runpy, sys\n"
            f"sys.argv = {argv!r}\n"
            "try:\n    runpy.run_path('train.py', run_name='__main__')\nexcept SystemExit as exit:\n"
            "    assert not exit.code, exit.code")
    assert imported_by(code) == ["matplotlib", "torch"]
    assert (tmp_path / "run" / "summary.json").is_file()
