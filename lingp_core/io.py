"""Save and load fitted models as .npz archives that need no pickle and no training data.

An archive holds named arrays and one header: a JSON text (a 0-d unicode array, so ``allow_pickle=False`` reads it)
with the format name and version, the model kind, its configuration (hyperparameters, plan, shapes) and a SHA-256
checksum of every array. Loading checks all of it, so a file from another format version, of another model kind,
truncated or edited after saving fails with an :class:`ArchiveError` that says which. Files are written to a
temporary name and renamed into place, so an interrupted save never leaves a half-written archive under the name.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from typing import Any

import numpy as np

import backends
from lingp_core._validate import LingpError

__all__ = ["ArchiveError", "FORMAT_VERSION", "fingerprint", "fingerprint_json", "jacobian_from_arrays",
           "jacobian_to_arrays", "load_archive", "save_archive"]

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


def save_archive(path: Any, kind: str, arrays: dict[str, Any], config: dict[str, Any]) -> str:
    """Write ``arrays`` (NumPy or CuPy, copied to the host) and a JSON ``config`` to the .npz file ``path``.

    Parameters
    ----------
    path : str or os.PathLike
        The file; ``.npz`` is appended when missing (as ``numpy.savez`` does).
    kind : str
        The model class name, checked again at load.
    arrays : dict of str to array
        What prediction needs; no object arrays.
    config : dict
        JSON-serializable hyperparameters and settings.

    Returns
    -------
    str
        The path written.
    """
    path = os.fspath(path)
    if not path.endswith(".npz"):
        path += ".npz"
    host = {name: _host(a) for name, a in arrays.items()}
    for name, a in host.items():
        if a.dtype == object:
            raise TypeError(f"array {name!r} has dtype object; archives hold numeric arrays only")
    header = {"format": _FORMAT, "version": FORMAT_VERSION, "kind": kind, "config": config,
              "config_sha256": fingerprint_json(config), "checksums": {name: _digest(a) for name, a in host.items()}}
    text = json.dumps(header, sort_keys=True, allow_nan=False)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{_HEADER: np.array(text)}, **host)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def load_archive(path: Any, kind: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read an archive written by :func:`save_archive` for a model of class ``kind``; verify everything.

    Returns
    -------
    arrays : dict of str to numpy.ndarray
        Every array, checksum-verified, on the host.
    config : dict
        The saved configuration.

    Raises
    ------
    FileNotFoundError
        No such file.
    ArchiveError
        Not a lingp archive, another format version or model kind, truncated, or an array whose checksum does not
        match (the file was modified after saving).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no saved model at {path!r}")
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as data:  # our handle: closed on any error
            contents = {name: data[name] for name in data.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as exc:
        raise ArchiveError(f"{path!r} is not a readable lingp archive (truncated or not an .npz file): "
                           f"{type(exc).__name__}: {exc}") from None
    if _HEADER not in contents:
        raise ArchiveError(f"{path!r} is an .npz file but not a lingp archive (no header)")
    try:
        header = json.loads(str(contents.pop(_HEADER)))
    except json.JSONDecodeError as exc:
        raise ArchiveError(f"{path!r}: the header is not valid JSON ({exc}); the file was modified") from None
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        raise ArchiveError(f"{path!r} is not a lingp archive (format {header.get('format')!r})")
    if header.get("version") != FORMAT_VERSION:
        raise ArchiveError(f"{path!r} has archive format version {header.get('version')!r}; this lingp reads version "
                           f"{FORMAT_VERSION}; refit the model with this version, or load it with the lingp that "
                           "saved it")
    if header.get("kind") != kind:
        raise ArchiveError(f"{path!r} holds a {header.get('kind')!r}, not a {kind!r}; load it with "
                           f"{header.get('kind')}.load")
    if fingerprint_json(header.get("config")) != header.get("config_sha256"):
        raise ArchiveError(f"{path!r}: the saved configuration fails its checksum; the file was modified")
    checksums = header.get("checksums", {})
    if set(checksums) != set(contents):
        raise ArchiveError(f"{path!r}: arrays {sorted(contents)} do not match the header's {sorted(checksums)}; the "
                           "file was modified")
    for name, array in contents.items():
        if _digest(array) != checksums[name]:
            raise ArchiveError(f"{path!r}: array {name!r} (shape {array.shape}, {array.dtype}) fails its checksum; "
                               "the file was modified or corrupted after saving")
    return contents, header["config"]


# ----- Jacobian blocks ----------------------------------------------------------------------------------------------

def jacobian_to_arrays(J: Any, prefix: str = "J") -> tuple[dict[str, Any], dict[str, Any]]:
    """The arrays and the JSON description of a :class:`~lingp_core.jacobian.JacobianBlocks`, for an archive."""
    from lingp_core.jacobian import DenseBlock

    arrays: dict[str, Any] = {f"{prefix}_f0": J.f0}
    blocks = []
    for i, b in enumerate(J.blocks):
        entry = {"kind": b.kind, "names": list(b.names), "shapes": [list(s) for s in b.shapes], "c": b.c}
        if isinstance(b, DenseBlock):
            arrays[f"{prefix}_{i}_values"] = b.values
        else:
            arrays[f"{prefix}_{i}_A"], arrays[f"{prefix}_{i}_delta"] = b.A, b.delta
            entry.update(has_weight=b.has_weight, has_bias=b.has_bias)
        blocks.append(entry)
    return arrays, {"blocks": blocks, "outputs": list(J.outputs)}


def jacobian_from_arrays(arrays: dict[str, np.ndarray], config: dict[str, Any], backend: Any,
                         prefix: str = "J") -> Any:
    """Rebuild the JacobianBlocks written by :func:`jacobian_to_arrays` on ``backend``."""
    from lingp_core.jacobian import DenseBlock, FactoredLinearBlock, JacobianBlocks

    xp = backend.xp
    blocks = []
    for i, entry in enumerate(config["blocks"]):
        if entry["kind"] == "dense":
            blocks.append(DenseBlock(entry["names"], entry["shapes"], backend.asarray(arrays[f"{prefix}_{i}_values"]),
                                     entry["c"], xp))
        else:
            A, delta = backend.asarray(arrays[f"{prefix}_{i}_A"]), backend.asarray(arrays[f"{prefix}_{i}_delta"])
            blocks.append(FactoredLinearBlock(entry["names"], entry["shapes"], A, delta,
                                              has_weight=entry["has_weight"], has_bias=entry["has_bias"], xp=xp))
    return JacobianBlocks(backend.asarray(arrays[f"{prefix}_f0"]), blocks, backend=backend, outputs=config["outputs"])
