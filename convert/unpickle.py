"""Read CIFAR's pickles without letting a file run code: an unpickler that builds only what the real files hold.

`pickle.loads` calls whatever a file names (`os.system`, `builtins.exec`, ...), so a `data_batch_1` copied from
a stranger could run anything. The real files (Python 2 protocol-2 pickles, and the same re-saved by Python 3)
hold dicts, lists, strings, bytes, numbers and numpy arrays; an array is rebuilt through numpy's
`_reconstruct`, `ndarray` and `dtype`, and Python 3 stores bytes as `_codecs.encode(text, 'latin1')`.
Those are the only callables allowed; anything else stops the load before it is called.
"""

from __future__ import annotations

import _codecs
import io
import pickle

import numpy as np

from common.errors import UserError

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct


def _latin1(text: str, encoding: str = "utf-8") -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it for bytes, refusing any other codec."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}")
    return _codecs.encode(text, encoding)


ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # written by numpy 1.x (the originals)
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # written by numpy 2.x
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1,
}


class _Refused(pickle.UnpicklingError):
    """A pickle asked for something a CIFAR file never holds (the message: what, quoted onto one line)."""


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(ascii(f"{module}.{name}")) from None

    def persistent_load(self, pid: object) -> object:
        raise _Refused("a persistent id")


def load_cifar_pickle(data: bytes, name: str) -> dict:
    """A CIFAR pickle as a dict with str keys (Python 2 originals have bytes or latin-1 keys).

    UserError, naming `name`, for a damaged file and for one that asks to call anything but numpy's array
    reconstruction: such a file is refused before any of its code runs.
    """
    try:
        obj = _CifarUnpickler(io.BytesIO(data), encoding="latin1").load()
    except _Refused as exc:
        raise UserError(f"{name} is not a plain CIFAR pickle: it asks to call {exc}, which could run code, so it "
                        "was not loaded (only arrays, lists, strings and numbers are read); download the dataset "
                        "again from its official source") from None
    except Exception:  # a damaged pickle can raise almost anything
        obj = None
    if not isinstance(obj, dict):
        raise UserError(f"{name} is truncated or not a CIFAR pickle; download the dataset again")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}
