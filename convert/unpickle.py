"""Read CIFAR's pickles without letting a file run code: an unpickler that builds only what the real files hold.

`pickle.loads` calls whatever a file names (`os.system`, `builtins.exec`, ...), so a `data_batch_1` copied from
a stranger could run anything. The real files (Python 2 protocol-2 pickles, and the same re-saved by Python 3)
hold dicts, lists, strings, bytes, numbers and numpy arrays; an array is rebuilt through numpy's
`_reconstruct`, `ndarray` and `dtype`, and Python 3 stores bytes as `_codecs.encode(text, 'latin1')` (the
empty bytes as `bytes()`).
Those are the only callables allowed; anything else stops the load before it is called.

Nor may a file make us allocate what no CIFAR file holds: numpy's pickles build an empty array and then fill
it from bytes inside the file, so `ndarray` called directly (a 193-byte file asked for 1,000,000 x 3072 zeros,
3 GB) is refused, and so is any array larger than CIFAR-100's train data or of a non-numeric dtype, before
its memory is allocated.

Nor may a small file stand for a huge object: a pickle's memo lets a list hold the same list twice, so 27 levels of
that took 194 bytes and 4.26 GB once walked (a 22-level `batches.meta` became two 33.5 MB class names). What a
pickle built is measured before anything walks it (`_check_tree`): no list, tuple, dict or set reached twice (CIFAR
files never share one), containers two deep at most (a dict of lists), and bounded counts of items and of text.
"""

from __future__ import annotations

import _codecs
import io
import math
import pickle

import numpy as np

from beton_trainer.common.errors import UserError

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct

__all__ = ["MAX_ITEMS", "MAX_TEXT", "load_cifar_pickle"]


def _latin1(text: str, encoding: str = "utf-8") -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it for bytes, refusing any other codec."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}")
    return _codecs.encode(text, encoding)


MAX_ARRAY_VALUES = 50_000 * 3072  # CIFAR-100's train data, the largest array of any CIFAR file
NUMERIC_KINDS = "biuf"  # bool, signed and unsigned integers, floats: all a CIFAR array can be
MAX_DEPTH = 2  # containers nested: a CIFAR file is a dict of arrays, strings, numbers and lists of them
MAX_ITEMS = 200_000  # entries of all containers: CIFAR-100's train holds three lists of 50,000
MAX_TEXT = 16 << 20  # characters of strings and bytes, each counted where it is reached (CIFAR-100's train: ~1.5 MB)
CONTAINERS = (list, tuple, dict, set, frozenset)


class _Refused(pickle.UnpicklingError):
    """A pickle asked for something a CIFAR file never holds (the message: what, quoted onto one line)."""


class _NotCifar(pickle.UnpicklingError):
    """A pickle that runs nothing but would build what no CIFAR file holds (the message: what)."""


def _numeric(dtype: object) -> np.dtype:
    """`dtype` if it is a plain numeric dtype (no objects, strings, records or sub-arrays)."""
    if not (isinstance(dtype, np.dtype) and dtype.kind in NUMERIC_KINDS and dtype.fields is None
            and dtype.subdtype is None):
        raise _NotCifar(f"an array of dtype {ascii(str(dtype))} (CIFAR arrays are numbers)")
    return dtype


class _Array(np.ndarray):
    """The only array class a pickle gets: numpy's `_reconstruct` makes it empty, and `__setstate__` checks the
    shape and dtype before numpy allocates for them. Calling it directly (as `ndarray(shape, dtype)`, which
    allocates) is refused; loaded arrays are handed on as plain ndarrays."""

    def __new__(cls, *args: object, **kwargs: object) -> np.ndarray:
        raise _NotCifar("an array by calling numpy.ndarray directly, as numpy's own pickles never do")

    def __setstate__(self, state: tuple) -> None:
        if not isinstance(state, tuple) or len(state) != 5 or not isinstance(state[1], tuple):
            raise _NotCifar("an array state numpy never writes")
        shape, dtype = state[1], _numeric(state[2])
        if not all(isinstance(n, int) and n >= 0 for n in shape) or math.prod(shape) > MAX_ARRAY_VALUES:
            raise _NotCifar(f"an array of shape {ascii(shape)}, larger than any CIFAR file holds "
                            f"({MAX_ARRAY_VALUES:,} values at most)")
        if not isinstance(state[4], bytes) or len(state[4]) != math.prod(shape) * dtype.itemsize:
            raise _NotCifar(f"an array of shape {ascii(shape)} whose data is not its size")
        super().__setstate__(state)


def _reconstruct_empty(subtype: object, shape: object, dtype: object) -> np.ndarray:
    """numpy's `_reconstruct` as its pickles call it: an empty array (its data follows in `__setstate__`)."""
    if subtype is not _Array or shape != (0,) or not isinstance(dtype, bytes) or len(dtype) > 8:
        raise _NotCifar("an array that numpy's pickles never build")
    return _reconstruct(_Array, (0,), dtype)


def _dtype(spec: object, align: object = False, copy: object = False) -> np.dtype:
    """`numpy.dtype` as its pickles call it, for numeric type codes only ('u1', 'i8', 'f4', ...)."""
    if not isinstance(spec, str) or len(spec) > 4:
        raise _NotCifar(f"a dtype of {ascii(spec)}")
    try:
        return _numeric(np.dtype(spec, bool(align), bool(copy)))
    except TypeError:
        raise _NotCifar(f"a dtype of {ascii(spec)}") from None


def _empty_bytes(*args: object) -> bytes:
    """`bytes()` as protocol-2 pickles write an empty bytes object (an empty array's data), and nothing more:
    `bytes(n)` would allocate n zeros."""
    if args:
        raise _NotCifar(f"bytes from {ascii(type(args[0]).__name__)} (only the empty bytes are pickled this way)")
    return b""


ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_empty,  # written by numpy 1.x (the originals)
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_empty,  # written by numpy 2.x
    ("numpy", "ndarray"): _Array,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _latin1,
    ("__builtin__", "bytes"): _empty_bytes,  # the empty bytes, as Python 3 writes protocol 2
    ("builtins", "bytes"): _empty_bytes,
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(ascii(f"{module}.{name}")) from None

    def persistent_load(self, pid: object) -> object:
        raise _Refused("a persistent id")


def _check_tree(obj: object) -> None:
    """Refuse, before anything walks `obj`, what walking it would cost more than a CIFAR file's contents: a
    container reached twice (a shared or cyclic reference, which grows exponentially when walked), containers
    nested deeper than MAX_DEPTH, more than MAX_ITEMS entries or MAX_TEXT characters. Visits each container
    once, without recursion."""
    seen: set[int] = set()
    stack, items, text = [(obj, 0)], 0, 0
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (str, bytes)):
            text += len(node)
            if text > MAX_TEXT:
                raise _NotCifar(f"more than {MAX_TEXT:,} characters of text once its shared strings are counted "
                                "where they are used")
            continue
        if not isinstance(node, CONTAINERS):
            continue
        kind = type(node).__name__
        if id(node) in seen:
            raise _NotCifar(f"a {kind} reached twice (a shared or cyclic reference: it grows exponentially when "
                            "walked, and CIFAR files have none)")
        seen.add(id(node))
        if depth >= MAX_DEPTH:
            raise _NotCifar(f"a {kind} nested {depth + 1} deep (a CIFAR file is a dict of arrays, strings, numbers "
                            "and lists of them)")
        items += len(node)
        if items > MAX_ITEMS:
            raise _NotCifar(f"containers of more than {MAX_ITEMS:,} items")
        stack += [(child, depth + 1) for child in ([*node.keys(), *node.values()] if isinstance(node, dict)
                                                   else node)]


def load_cifar_pickle(data: bytes, name: str) -> dict:
    """A CIFAR pickle as a dict with str keys (Python 2 originals have bytes or latin-1 keys).

    UserError, naming `name`, for a damaged file, for one that asks to call anything but numpy's array
    reconstruction (refused before any of its code runs), for one that would build an array no CIFAR file
    holds (refused before it is allocated) and for one whose lists would expand when walked (`_check_tree`).
    """
    try:
        obj = _CifarUnpickler(io.BytesIO(data), encoding="latin1").load()
        _check_tree(obj)
    except _Refused as exc:
        raise UserError(f"{name} is not a plain CIFAR pickle: it asks to call {exc}, which could run code, so it "
                        "was not loaded (only arrays, lists, strings and numbers are read); download the dataset "
                        "again from its official source") from None
    except _NotCifar as exc:
        raise UserError(f"{name} is not a CIFAR pickle: it builds {exc}; download the dataset again from its "
                        "official source") from None
    except Exception:  # a damaged pickle can raise almost anything
        obj = None
    if not isinstance(obj, dict):
        raise UserError(f"{name} is truncated or not a CIFAR pickle; download the dataset again")
    return {k.decode() if isinstance(k, bytes) else k: v.view(np.ndarray) if isinstance(v, np.ndarray) else v
            for k, v in obj.items()}
