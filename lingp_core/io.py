"""Save and load fitted models as .npz archives that need no pickle and no training data.

An archive holds named arrays and one header: a JSON text (a 0-d unicode array, so ``allow_pickle=False`` reads it)
with the format name and version, the model kind, its configuration (hyperparameters, plan, shapes) and a SHA-256
checksum of every array. Loading checks all of it, so a file from another format version, of another model kind,
truncated or edited after saving fails with an :class:`ArchiveError` that says which. Files are written to a
temporary name and renamed into place, so an interrupted save never leaves a half-written archive under the name.
"""
from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import math
import os
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

import backends
from lingp_core._validate import (
    ArgumentTypeError,
    DTypeError,
    InvalidOptionError,
    LingpError,
    NonFiniteError,
)

__all__ = ["ArchiveError", "ArchiveNotFoundError", "ArchivePathError", "FORMAT_VERSION", "check_expected",
           "fingerprint", "fingerprint_json", "jacobian_from_arrays", "jacobian_to_arrays", "load_archive",
           "save_archive"]

#: Version of the archive layout; bumped whenever what an archive holds changes meaning.
FORMAT_VERSION = 1
_FORMAT = "lingp"
_HEADER = "__lingp_header__"


class ArchiveError(LingpError, ValueError):
    """A saved model cannot be read: not a lingp archive, another version or kind, truncated or modified."""


def _host(array: Any) -> np.ndarray:
    name = backends.backend_name_of(array)
    return backends.get_backend(name).to_numpy(array) if name else np.asarray(array)


def _digest(array: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(f"{array.dtype.str}{array.shape}".encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def fingerprint_json(obj: Any) -> str:
    """SHA-256 of a JSON-serializable object (keys sorted), e.g. of hyperparameters."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, allow_nan=False).encode()).hexdigest()


def fingerprint(*arrays: Any) -> str:
    """SHA-256 over the dtypes, shapes and bytes of the arrays (NumPy or CuPy), e.g. of the training data."""
    h = hashlib.sha256()
    for array in arrays:
        h.update(_digest(_host(array)).encode())
    return h.hexdigest()


class ArchivePathError(ArchiveError, OSError):
    """The archive's path cannot be used: a folder instead of a file, or a folder that is missing or not writable.

    Also an :class:`OSError`, as the error it replaces was."""


class ArchiveNotFoundError(ArchivePathError, FileNotFoundError):
    """No archive at the path, or the folder to save into does not exist (also a :class:`FileNotFoundError`)."""


# ----- archive paths ------------------------------------------------------------------------------------------------

def _archive_path(path: Any) -> tuple[str, str]:
    """The one rule, shared by save and load, from a user's path to the archive file.

    ``path`` is a str or os.PathLike; ``~`` is expanded and ``.npz`` appended when missing (any case: ``m.NPZ`` is
    kept as it is), so ``save("m")`` and ``load("m")`` both mean ``m.npz``. A folder (a path ending with a separator,
    or an existing folder) is refused: numpy would write a hidden ``folder/.npz``. Returns (the file, the path as the
    user wrote it).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentTypeError(f"path must be a str or os.PathLike (e.g. pathlib.Path), got {type(path).__name__} "
                                f"{path!r}"[:300])
    given = os.fspath(path)
    if not isinstance(given, str):
        raise ArgumentTypeError(f"path must be text, got the bytes path {given!r}; decode it with os.fsdecode")
    expanded = os.path.expanduser(given)
    separators = tuple(s for s in (os.sep, os.altsep) if s)
    if not expanded:
        raise ArchivePathError("path is empty; name the archive file, e.g. 'model.npz'")
    if expanded.endswith(separators) or os.path.isdir(expanded):
        raise ArchivePathError(f"path {given!r} is a folder, not a file; name the archive file in it, e.g. "
                               f"{os.path.join(expanded, 'model.npz')!r}")
    target = expanded if expanded.lower().endswith(".npz") else expanded + ".npz"  # "m.NPZ" is an archive name too
    if os.path.isdir(target):
        raise ArchivePathError(f"path {given!r} means the archive {target!r}, which is an existing folder; choose "
                               "another name")
    return target, given


def _named(target: str, given: str) -> str:
    """The archive as the user named it, and the file it means when that differs (for messages)."""
    return repr(target) if target == given else f"{target!r} (from {given!r})"


# ----- save ---------------------------------------------------------------------------------------------------------

#: Array names numpy.savez cannot take as keywords (its own parameters), and the header's name.
_RESERVED = frozenset({_HEADER, "file", "allow_pickle"})
_NUMERIC_KINDS = "biufc"  # bool, signed and unsigned int, float, complex


def _first_nonfinite(array: np.ndarray) -> str | None:
    """'holds 2 NaN and 1 Inf entries, the first at index (0, 3)' for a float/complex array, or None if all finite."""
    if array.dtype.kind not in "fc":
        return None
    finite = np.isfinite(array)
    if finite.all():
        return None
    n_nan = int(np.isnan(array).sum())
    first = tuple(int(i) for i in np.unravel_index(int(np.argmin(finite.ravel())), array.shape))
    return f"holds {n_nan} NaN and {finite.size - int(finite.sum()) - n_nan} Inf entries, the first at index {first}"


def _host_arrays(arrays: Any) -> dict[str, np.ndarray]:
    """The arrays to save on the host; named by str, numeric and finite (what load_archive accepts)."""
    if not isinstance(arrays, Mapping):
        raise ArgumentTypeError(f"arrays must be a dict of name to array, got {type(arrays).__name__}")
    host = {}
    for name, a in arrays.items():
        if not isinstance(name, str) or not name or name in _RESERVED:
            raise InvalidOptionError(f"array name {name!r} cannot be saved: names are non-empty str other than "
                                     f"{sorted(_RESERVED)}")
        host[name] = array = _host(a)
        if array.dtype.kind not in _NUMERIC_KINDS:
            raise DTypeError(f"array {name!r} has dtype {array.dtype}; archives hold numeric arrays only (bool, int, "
                             "float, complex)")
        problem = _first_nonfinite(array)
        if problem:
            raise NonFiniteError(f"array {name!r} (shape {array.shape}, {array.dtype}) {problem}; a model state never "
                                 "holds them, and load_archive would refuse the file")
    return host


def _header_text(kind: Any, config: Any, host: dict[str, np.ndarray]) -> str:
    """The JSON header: format, version, kind, config and the checksums of ``host``."""
    if not isinstance(kind, str):
        raise ArgumentTypeError(f"kind must be a str (the model class name), got {type(kind).__name__}")
    if not isinstance(config, dict):
        raise ArgumentTypeError(f"config must be a dict, got {type(config).__name__}")
    try:
        header = {"format": _FORMAT, "version": FORMAT_VERSION, "kind": kind, "config": config,
                  "config_sha256": fingerprint_json(config),
                  "checksums": {name: _digest(a) for name, a in host.items()}}
        return json.dumps(header, sort_keys=True, allow_nan=False)
    except TypeError as exc:
        raise ArgumentTypeError(f"config cannot be written as JSON: {exc}") from None
    except ValueError as exc:  # NaN or Inf, or a circular reference
        raise InvalidOptionError(f"config cannot be written as JSON: {exc}") from None


def _write_error(exc: OSError, given: str, target: str, folder: str) -> ArchivePathError:
    """The error for an OSError while writing, in the user's terms (their path and folder, not the temporary file)."""
    if isinstance(exc, PermissionError):
        why = f"the folder {folder!r} is not writable (or {target!r} is protected)"
    else:
        why = f"writing in the folder {folder!r} failed ({type(exc).__name__}: {exc.strerror or exc})"
    return ArchivePathError(f"cannot save the model to {given!r}: {why}")


def _write_atomically(target: str, given: str, host: dict[str, np.ndarray], text: str) -> None:
    """Write the archive to a temporary file in the target's folder and rename it into place.

    The temporary file is removed on any exception (KeyboardInterrupt included), so a failed save leaves the folder
    as it was: an archive already at ``target`` is untouched until the complete new file replaces it in one rename.
    """
    folder = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(folder):
        if os.path.exists(folder):
            raise ArchivePathError(f"cannot save the model to {given!r}: {folder!r} is a file, not a folder")
        raise ArchiveNotFoundError(f"cannot save the model to {given!r}: the folder {folder!r} does not exist; "
                                   "create it first")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as f:
            # allow_pickle=False: a belt to the numeric check; the names cannot clash (_RESERVED)
            np.savez(f, allow_pickle=False, **{_HEADER: np.array(text)}, **host)  # type: ignore[arg-type]
        os.replace(tmp, target)
        tmp = None
    except OSError as exc:
        raise _write_error(exc, given, target, folder) from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):  # keep the original error; a leftover is named .<archive>.*.tmp
                os.remove(tmp)


def save_archive(path: Any, kind: str, arrays: Mapping[str, Any], config: dict[str, Any]) -> str:
    """Write ``arrays`` (NumPy or CuPy, copied to the host) and a JSON ``config`` to the .npz file ``path``.

    The file is written under a temporary name in the same folder and renamed into place: a failed or interrupted
    save (KeyboardInterrupt included) leaves no file behind and an existing archive at ``path`` unchanged.

    Parameters
    ----------
    path : str or os.PathLike
        The file; ``~`` is expanded and ``.npz`` appended when missing (as ``numpy.savez`` does;
        :func:`load_archive` applies the same rule). Not a folder.
    kind : str
        The model class name, checked again at load.
    arrays : dict of str to array
        What prediction needs: numeric (bool, int, float, complex) arrays of any shape, without NaN or Inf.
    config : dict
        JSON-serializable hyperparameters and settings (no NaN or Inf).

    Returns
    -------
    str
        The path written (``~`` expanded, ending in ``.npz``).

    Raises
    ------
    ArgumentTypeError
        ``path`` is not a str or os.PathLike, ``kind`` not a str, ``config`` not a dict or not JSON-serializable.
    ArchivePathError
        ``path`` is a folder, or its folder is not writable (an :class:`ArchiveError` and an :class:`OSError`).
    ArchiveNotFoundError
        The folder of ``path`` does not exist (also a :class:`FileNotFoundError`).
    DTypeError, NonFiniteError, InvalidOptionError
        An array is not numeric, holds NaN or Inf, or has a reserved name; ``config`` holds NaN or Inf.
    """
    target, given = _archive_path(path)
    host = _host_arrays(arrays)
    _write_atomically(target, given, host, _header_text(kind, config, host))
    return target


# ----- load ---------------------------------------------------------------------------------------------------------

def _read_npz(target: str) -> dict[str, np.ndarray]:
    """Every array of the .npz file, ArchiveError (naming the array where one is at fault) if it cannot be read."""
    try:
        with open(target, "rb") as fh:  # our handle: closed on any error
            data = np.load(fh, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ArchiveError(f"{target!r} is a single .npy array, not a lingp archive (.npz)")
            with data:
                return {name: _read_member(target, data, name) for name in data.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as exc:
        if isinstance(exc, ArchiveError):
            raise
        raise ArchiveError(f"{target!r} is not a readable lingp archive (truncated or not an .npz file): "
                           f"{type(exc).__name__}: {exc}") from None


def _read_member(target: str, data: Any, name: str) -> np.ndarray:
    """One array of the open .npz file; ArchiveError naming it for a pickled (object) or unreadable member."""
    try:
        return data[name]
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise ArchiveError(f"{target!r}: array {name!r} holds Python objects (dtype object); lingp archives hold "
                               "numeric arrays only, so the file was not written by lingp or was modified") from None
        raise ArchiveError(f"{target!r}: array {name!r} cannot be read ({exc}); the file is truncated or "
                           "corrupted") from None
    except (zipfile.BadZipFile, EOFError, OSError, KeyError) as exc:
        raise ArchiveError(f"{target!r}: array {name!r} cannot be read ({type(exc).__name__}: {exc}); the file is "
                           "truncated or corrupted") from None


def _no_constant(token: str) -> Any:
    """json.loads hook: NaN and Infinity are not JSON, and save_archive never writes them."""
    raise ArchiveError(f"{token} is not valid in a lingp header")


def _finite_float(token: str) -> float:
    """json.loads hook: a number such as 1e400 reads as Inf, which save_archive never writes (and the config's
    checksum could not even be computed of)."""
    value = float(token)
    if not math.isfinite(value):
        raise ArchiveError(f"the number {token[:40]} is beyond float64's range")
    return value


def _read_header(target: str, contents: dict[str, np.ndarray], kind: str) -> dict[str, Any]:
    """The checked header (popped from ``contents``): a lingp archive of this version and kind, config verified."""
    if _HEADER not in contents:
        raise ArchiveError(f"{target!r} is an .npz file but not a lingp archive (no header)")
    raw = contents.pop(_HEADER)
    if raw.shape != () or raw.dtype.kind != "U":
        raise ArchiveError(f"{target!r}: the header is a {raw.dtype} array of shape {raw.shape}, not a text; the file "
                           "was modified")
    try:
        header = json.loads(str(raw), parse_constant=_no_constant, parse_float=_finite_float)
    except ValueError as exc:  # JSONDecodeError is a ValueError
        raise ArchiveError(f"{target!r}: the header is not valid JSON ({exc}); the file was modified") from None
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise ArchiveError(f"{target!r} is not a lingp archive (format {found!r})")
    if header.get("version") != FORMAT_VERSION:
        raise ArchiveError(f"{target!r} has archive format version {header.get('version')!r}; this lingp reads "
                           f"version {FORMAT_VERSION}; refit the model with this version, or load it with the lingp "
                           "that saved it")
    if header.get("kind") != kind:
        raise ArchiveError(f"{target!r} holds a {header.get('kind')!r}, not a {kind!r}; load it with "
                           f"{header.get('kind')}.load")
    config = header.get("config")
    if not isinstance(config, dict):
        raise ArchiveError(f"{target!r}: the saved configuration is a {type(config).__name__}, not a dict; the file "
                           "was modified")
    if fingerprint_json(config) != header.get("config_sha256"):
        raise ArchiveError(f"{target!r}: the saved configuration fails its checksum; the file was modified")
    checksums = header.get("checksums")
    if not isinstance(checksums, dict) or not all(isinstance(c, str) for c in checksums.values()):
        raise ArchiveError(f"{target!r}: the header's checksums are not a dict of texts; the file was modified")
    return header


def _check_arrays(target: str, contents: dict[str, np.ndarray], checksums: dict[str, str]) -> None:
    """Every array matches its checksum, is numeric and finite; the arrays are exactly those the header lists."""
    if set(checksums) != set(contents):
        raise ArchiveError(f"{target!r}: arrays {sorted(contents)} do not match the header's {sorted(checksums)}; "
                           "the file was modified")
    for name, array in contents.items():
        if _digest(array) != checksums[name]:
            raise ArchiveError(f"{target!r}: array {name!r} (shape {array.shape}, {array.dtype}) fails its checksum; "
                               "the file was modified or corrupted after saving")
        if array.dtype.kind not in _NUMERIC_KINDS:
            raise ArchiveError(f"{target!r}: array {name!r} has the non-numeric dtype {array.dtype} (shape "
                               f"{array.shape}); lingp archives hold numeric arrays only, so the file was modified")
        problem = _first_nonfinite(array)
        if problem:
            raise ArchiveError(f"{target!r}: array {name!r} (shape {array.shape}, {array.dtype}) {problem}; a saved "
                               "model never holds them, so the file was modified")


# ----- expected shapes and dtypes -----------------------------------------------------------------------------------

#: An expected shape: None, a tuple of int / None / str (a named length), or a callable check(shape) -> bool.
ShapeSpec = Sequence[int | str | None] | Callable[[tuple[int, ...]], bool] | None
#: An expected dtype: None, a str of dtype kind letters ("f", "iu", ...), or a sequence of exact dtypes.
DTypeSpec = str | Sequence[Any] | None
#: ``expected`` of :func:`load_archive`: {name or pattern: (shape, dtype)}, or a callable of the config returning it.
Expected = Mapping[str, tuple[ShapeSpec, DTypeSpec]] | Callable[[dict[str, Any]], Mapping[str, tuple[Any, Any]]]


def _parse_spec(key: Any, spec: Any) -> tuple[ShapeSpec, DTypeSpec]:
    """Check one ``expected`` entry (a programming error in the model when wrong, so not an ArchiveError)."""
    if not isinstance(key, str):
        raise ArgumentTypeError(f"expected: keys are array names (str), got {key!r}")
    if not isinstance(spec, (tuple, list)) or len(spec) != 2:
        raise ArgumentTypeError(f"expected[{key!r}] must be a (shape, dtype) pair, got {spec!r}")
    shape, dtype = spec
    if not (shape is None or callable(shape) or (isinstance(shape, (tuple, list)) and all(
            d is None or isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool) and d >= 0)
            for d in shape))):
        raise ArgumentTypeError(f"expected[{key!r}]: the shape must be None, a callable, or a tuple of int >= 0, "
                                f"None (any length) and str (a named length); got {shape!r}")
    if isinstance(dtype, str):
        if not dtype or set(dtype) - set(_NUMERIC_KINDS):
            raise InvalidOptionError(f"expected[{key!r}]: the dtype kinds {dtype!r} must be letters of "
                                     f"{_NUMERIC_KINDS!r} (bool, int, uint, float, complex)")
    elif dtype is not None:
        try:
            dtype = tuple(np.dtype(d) for d in dtype)
        except TypeError as exc:
            raise ArgumentTypeError(f"expected[{key!r}]: the dtype must be None, a str of kinds like 'f' or 'iu', or "
                                    f"a sequence of dtypes; got {dtype!r} ({exc})") from None
    return shape, dtype


def _dtype_ok(dtype: np.dtype, wanted: DTypeSpec) -> bool:
    if wanted is None:
        return True
    return dtype.kind in wanted if isinstance(wanted, str) else dtype in wanted


def _shape_problem(shape: tuple[int, ...], wanted: ShapeSpec, name: str,
                   dims: dict[str, tuple[int, str]]) -> str | None:
    """Why ``shape`` is not ``wanted`` (None if it is); binds the named lengths in ``dims`` to (length, array)."""
    if wanted is None:
        return None
    if callable(wanted):
        return None if wanted(shape) else f"a shape accepted by {getattr(wanted, '__qualname__', repr(wanted))}"
    described = "(" + ", ".join("any" if d is None else str(d) for d in wanted) + ("," * (len(wanted) == 1)) + ")"
    if len(shape) != len(wanted) or any(isinstance(d, int) and d != s for d, s in zip(wanted, shape)):
        return f"shape {described}"
    for d, s in zip(wanted, shape):
        if isinstance(d, str):
            length, source = dims.setdefault(d, (s, name))
            if length != s:
                return f"shape {described} with {d} = {length}, as in array {source!r}"
    return None


def _check_expected(target: str, contents: dict[str, np.ndarray], expected: Any, config: dict[str, Any]) -> None:
    """ArchiveError naming the first array whose shape or dtype is not what the model declared."""
    if callable(expected):
        expected = expected(config)
    if not isinstance(expected, Mapping):
        raise ArgumentTypeError(f"expected must be a mapping (or a callable of the config returning one), got "
                                f"{type(expected).__name__}")
    dims: dict[str, tuple[int, str]] = {}
    for key, spec in expected.items():
        shape_spec, dtype_spec = _parse_spec(key, spec)
        if any(c in key for c in "*?["):  # a pattern: every matching array, possibly none
            names = sorted(n for n in contents if fnmatch.fnmatchcase(n, key))
        elif key in contents:
            names = [key]
        else:
            raise ArchiveError(f"{target!r}: the model needs an array {key!r}, which the archive lacks (it holds "
                               f"{sorted(contents)})")
        for name in names:
            array = contents[name]
            wanted = _shape_problem(array.shape, shape_spec, name, dims)
            if wanted is None and not _dtype_ok(array.dtype, dtype_spec):
                wanted = f"dtype kind {dtype_spec!r}" if isinstance(dtype_spec, str) else \
                    "dtype " + " or ".join(map(str, dtype_spec or ()))
            if wanted is not None:
                raise ArchiveError(f"{target!r}: array {name!r} has shape {array.shape} and dtype {array.dtype}; the "
                                   f"model expects {wanted}; the file was modified or written by another version")


def check_expected(path: Any, arrays: Mapping[str, np.ndarray], expected: Expected) -> None:
    """Check the arrays :func:`load_archive` returned against ``expected`` (as there), for models whose expected
    shapes also depend on the arrays present (e.g. counts checked against an array's length first).

    Raises
    ------
    ArchiveError
        The first array whose shape or dtype is not what ``expected`` declares, or a required array missing; the
        message names the file, the array, its shape and dtype and what was expected.
    ArgumentTypeError, InvalidOptionError
        ``expected`` is malformed.
    """
    target, _ = _archive_path(path)
    _check_expected(target, dict(arrays), expected, {})


def load_archive(path: Any, kind: str, *, expected: Expected | None = None
                 ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read an archive written by :func:`save_archive` for a model of class ``kind``; verify everything.

    Checks, in order: the file exists (same path rule as :func:`save_archive`: ``~`` expanded, ``.npz`` appended when
    missing); it is an .npz file with a lingp header of this format version and ``kind``; the config is a dict and
    matches its checksum; the arrays are exactly those the header lists, each matches its checksum, has a numeric
    dtype (bool, int, uint, float, complex) and holds no NaN or Inf; finally each array matches ``expected``.

    Parameters
    ----------
    path : str or os.PathLike
        The archive.
    kind : str
        The model class name the archive must hold.
    expected : mapping or callable, optional
        What the model needs, as ``{name: (shape, dtype)}``, or a callable taking the (verified) config dict and
        returning that mapping (for shapes that depend on the config). Checks shapes and dtypes even where an
        archive's checksums were recomputed after editing it.

        - ``name``: an array name, which must be present; or a pattern with ``*``, ``?`` or ``[...]``
          (:func:`fnmatch.fnmatchcase`), checked on every matching array and allowed to match none.
        - ``shape``: ``None`` (any shape); a tuple whose length is the number of dimensions, each entry an int (that
          length), ``None`` (any length) or a str naming a length that must be the same wherever the name appears in
          this call (e.g. ``("n", "c")`` for one array and ``("n",)`` for another); or a callable
          ``check(shape: tuple[int, ...]) -> bool``.
        - ``dtype``: ``None`` (any numeric dtype); a str of NumPy dtype kind letters, ``"f"`` float, ``"c"`` complex,
          ``"i"`` signed int, ``"u"`` unsigned int, ``"b"`` bool (e.g. ``"f"`` or ``"iu"``; a str always means kinds,
          never a dtype code); or a sequence of exact dtypes, e.g. ``(np.float32, np.float64)``.

        Arrays that no key names are not checked. Example::

            expected=lambda config: {"constant": ((config["c"],), "f"), "J_f0": (("n", config["c"]), "f"),
                                     "J_*_A": (("n", None), "f"), "task*_alpha": (None, (np.float64,))}

    Returns
    -------
    arrays : dict of str to numpy.ndarray
        Every array, checksum-verified, on the host.
    config : dict
        The saved configuration.

    Raises
    ------
    ArchiveNotFoundError
        No file at the path (also a :class:`FileNotFoundError`); the message names the file tried.
    ArchivePathError
        The path is a folder.
    ArgumentTypeError
        ``path`` is not a str or os.PathLike; ``expected`` is malformed.
    ArchiveError
        Not a lingp archive, another format version or model kind, truncated, a config that is not a dict, an array
        whose checksum does not match (the file was modified after saving), that is not numeric or not finite, or
        that does not match ``expected`` (the message names the array, its shape and dtype and what was expected).
    """
    target, given = _archive_path(path)
    if not isinstance(kind, str):
        raise ArgumentTypeError(f"kind must be a str (the model class name), got {type(kind).__name__}")
    if not os.path.isfile(target):
        hint = ""
        if target != os.path.expanduser(given) and os.path.isfile(os.path.expanduser(given)):
            hint = (f"; a file {given!r} exists, but archives are named with .npz (save_archive adds it): rename it "
                    f"to {target!r}")
        raise ArchiveNotFoundError(f"no saved model at {_named(target, given)}{hint}")
    contents = _read_npz(target)
    header = _read_header(target, contents, kind)
    _check_arrays(target, contents, header["checksums"])
    if expected is not None:
        _check_expected(target, contents, expected, header["config"])
    return contents, header["config"]


# ----- Jacobian blocks ----------------------------------------------------------------------------------------------

def jacobian_to_arrays(J: Any, prefix: str = "J") -> tuple[dict[str, Any], dict[str, Any]]:
    """The arrays and the JSON description of a :class:`~lingp_core.jacobian.JacobianBlocks`, for an archive.

    Each block kind names its arrays and writes its description (``to_arrays``); array ``{prefix}_{i}_{name}`` is
    array ``name`` of block i. The weights fingerprint goes into the description.
    """
    arrays: dict[str, Any] = {f"{prefix}_f0": J.f0}
    blocks = []
    for i, b in enumerate(J.blocks):
        block_arrays, entry = b.to_arrays()
        arrays.update({f"{prefix}_{i}_{name}": a for name, a in block_arrays.items()})
        blocks.append(entry)
    return arrays, {"blocks": blocks, "outputs": list(J.outputs), "weights_fingerprint": J.weights_fingerprint,
                    "block_weights": None if J.block_weights is None else list(J.block_weights)}


def jacobian_from_arrays(arrays: dict[str, np.ndarray], config: dict[str, Any], backend: Any,
                         prefix: str = "J") -> Any:
    """Rebuild the JacobianBlocks written by :func:`jacobian_to_arrays` on ``backend``, validated as hand-built blocks
    are. A description without a weights fingerprint (an archive saved before fingerprints) gives None: unknown.

    Raises
    ------
    ArchiveError
        An unknown block kind, a missing array or description entry, or arrays that do not fit together (shapes,
        dtypes, NaN/Inf): the archive was modified.
    """
    from lingp_core.jacobian import JacobianBlocks, _Block

    try:
        blocks = []
        for i, entry in enumerate(config["blocks"]):
            kind = _Block.kind_class(entry["kind"])
            block_arrays = {name: backend.asarray(arrays[f"{prefix}_{i}_{name}"]) for name in kind.array_names}
            blocks.append(kind.from_arrays(entry, block_arrays, backend.xp))
        return JacobianBlocks(backend.asarray(arrays[f"{prefix}_f0"]), blocks, backend=backend,
                              outputs=config["outputs"], weights_fingerprint=config.get("weights_fingerprint"),
                              block_weights=config.get("block_weights"))
    except (KeyError, TypeError, LingpError) as exc:
        raise ArchiveError(f"the archive's Jacobian blocks ({prefix}) cannot be rebuilt, the archive was modified: "
                           f"{type(exc).__name__}: {exc}") from exc
