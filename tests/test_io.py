"""Archive I/O (lingp_core.io): one path rule for save and load, folder and unwritable paths refused in the user's
terms, no partial file after an interrupted save, and load refusing every modified, malformed or mis-shaped array.

Archives are tampered with in two ways: an array changed without fixing the header (the checksum must catch it, for
every array of a real model's archive), and an array changed with the checksums recomputed (as a hostile or careless
editor would), which only the content checks and ``expected`` can catch.
"""
from __future__ import annotations

import errno
import functools
import json
import os
import pathlib
import signal
import warnings

import numpy as np
import pytest
import torch

import lingp_core as lg
from lingp_core import io
from lingp_core.io import ArchiveError, ArchiveNotFoundError, ArchivePathError, load_archive, save_archive
from lingp_core.laplace import LaplaceClassifier

KIND = "Synthetic"


def synthetic() -> tuple[dict[str, np.ndarray], dict]:
    """A small archive's arrays (several shapes and dtypes, two of one pattern) and its config."""
    rng = np.random.default_rng(7)
    arrays = {"a": rng.standard_normal((4, 3)), "b": rng.standard_normal(4).astype(np.float32),
              "idx": np.arange(5, dtype=np.int64), "mask": np.array([True, False]),
              "task0_x": rng.standard_normal((2, 2)), "task1_x": rng.standard_normal((2, 2))}
    return arrays, {"n": 4, "c": 3, "name": "synthetic"}


def listing(folder: pathlib.Path) -> list[str]:
    return sorted(os.listdir(folder))


def read_npz(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=True) as z:
        return {k: z[k] for k in z.files}


KEEP = object()  # rewrite(): leave the config as saved


def rewrite(path, out, *, arrays=None, config=KEEP, header=None):
    """Write ``out``: the archive at ``path`` with arrays replaced/added (None removes one), and the header's checksums
    and config hash recomputed as an editor covering their tracks would (``header`` edits the JSON afterwards)."""
    contents = read_npz(path)
    head = json.loads(str(contents.pop(io._HEADER)))
    for name, value in (arrays or {}).items():
        if value is None:
            contents.pop(name)
        else:
            contents[name] = value
    if config is not KEEP:
        head["config"] = config
        head["config_sha256"] = io.fingerprint_json(config)
    head["checksums"] = {name: io._digest(a) for name, a in contents.items()}
    text = json.dumps(head, sort_keys=True)
    if header is not None:
        text = header(text)
    np.savez(out, **{io._HEADER: np.array(text)}, **contents)
    return out


def changed_value(a: np.ndarray) -> np.ndarray:
    """A copy of ``a`` with its first entry changed (kept finite, same dtype and shape)."""
    b = a.copy()
    flat = b.reshape(-1)
    if b.dtype.kind == "b":
        flat[0] = not flat[0]
    elif b.dtype.kind in "iu":
        flat[0] = flat[0] + 1 if flat[0] < np.iinfo(b.dtype).max else flat[0] - 1
    else:
        flat[0] = flat[0] * (1 + 4 * np.finfo(b.dtype).eps) + np.finfo(b.dtype).tiny * 4 if flat[0] else 1.0
    assert not np.array_equal(a, b)
    return b


# ----- one path rule ------------------------------------------------------------------------------------------------

class TextPath:
    """An os.PathLike that is neither str nor pathlib.Path."""

    def __init__(self, text):
        self.text = text

    def __fspath__(self):
        return self.text


@pytest.mark.parametrize("kind_of_path", ["str", "Path", "PathLike", "tilde"])
@pytest.mark.parametrize("suffix", ["", ".npz"])
def test_save_and_load_apply_one_path_rule(tmp_path, monkeypatch, kind_of_path, suffix):
    arrays, config = synthetic()
    monkeypatch.setenv("HOME", str(tmp_path))  # "~" expands here, both ways
    given = {"str": str(tmp_path / f"m{suffix}"), "Path": tmp_path / f"m{suffix}",
             "PathLike": TextPath(str(tmp_path / f"m{suffix}")), "tilde": f"~/m{suffix}"}[kind_of_path]
    written = save_archive(given, KIND, arrays, config)
    assert written == str(tmp_path / "m.npz") and listing(tmp_path) == ["m.npz"]
    loaded, loaded_config = load_archive(given, KIND)  # the same user path finds what save wrote
    assert loaded_config == config and list(loaded) == list(arrays)
    for name, a in arrays.items():
        assert loaded[name].dtype == a.dtype and loaded[name].shape == a.shape
        np.testing.assert_array_equal(loaded[name], a)


def test_an_upper_case_suffix_names_the_archive_itself(tmp_path):
    arrays, config = synthetic()
    written = save_archive(tmp_path / "m.NPZ", KIND, arrays, config)
    assert written == str(tmp_path / "m.NPZ") and listing(tmp_path) == ["m.NPZ"]
    loaded, _ = load_archive(tmp_path / "m.NPZ", KIND)
    assert list(loaded) == list(arrays)


def test_model_save_and_load_accept_the_same_path(tmp_path):
    arrays, config = synthetic()
    save_archive(tmp_path / "model", KIND, arrays, config)
    with pytest.raises(ArchiveError, match="holds a 'Synthetic', not a 'LinearizedGP'"):  # found under the same rule
        lg.LinearizedGP.load(tmp_path / "model")


@pytest.mark.parametrize("bad", [123, b"m.npz", None, ["m.npz"]])
def test_path_of_another_type_is_refused(tmp_path, bad):
    arrays, config = synthetic()
    with pytest.raises(lg.ArgumentTypeError, match="path must be"):
        save_archive(bad, KIND, arrays, config)
    with pytest.raises(lg.ArgumentTypeError, match="path must be"):
        load_archive(bad, KIND)
    with pytest.raises(lg.ArgumentTypeError, match="bytes path"):
        load_archive(TextPath(os.fsencode(str(tmp_path / "m.npz"))), KIND)


def test_folder_paths_are_refused_and_nothing_is_written(tmp_path):
    arrays, config = synthetic()
    (tmp_path / "sub").mkdir()
    (tmp_path / "taken.npz").mkdir()
    cases = [str(tmp_path) + os.sep, tmp_path, tmp_path / "sub", str(tmp_path / "new") + os.sep, tmp_path / "taken"]
    for path in cases:
        for call in (lambda p: save_archive(p, KIND, arrays, config), lambda p: load_archive(p, KIND)):
            with pytest.raises(ArchivePathError, match="folder") as info:
                call(path)
            assert isinstance(info.value, lg.LingpError) and isinstance(info.value, OSError)
            assert repr(os.fspath(path)) in str(info.value)  # the user's path, as written
    assert listing(tmp_path) == ["sub", "taken.npz"] and listing(tmp_path / "sub") == []  # no hidden ".npz"
    with pytest.raises(ArchivePathError, match="path is empty"):
        save_archive("", KIND, arrays, config)


def test_save_into_a_missing_folder_names_the_users_path(tmp_path):
    arrays, config = synthetic()
    path = tmp_path / "missing" / "deeper" / "m"
    with pytest.raises(ArchiveNotFoundError) as info:
        save_archive(path, KIND, arrays, config)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, lg.LingpError)
    assert repr(str(path)) in message and repr(str(path.parent)) in message and "does not exist" in message
    assert ".tmp" not in message
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArchivePathError, match="is a file, not a folder"):
        save_archive(tmp_path / "file" / "m", KIND, arrays, config)
    assert listing(tmp_path) == ["file"]


def test_save_into_an_unwritable_folder_names_the_users_path(tmp_path, monkeypatch):
    """The OS refuses to create the temporary file (a read-only folder; as root a chmod does not refuse, so the
    refusal is injected): the message names the user's path and folder, not the temporary name."""
    arrays, config = synthetic()
    folder = tmp_path / "ro"
    folder.mkdir()

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(folder / ".m.npz.abc123.tmp"))

    monkeypatch.setattr(io.tempfile, "mkstemp", refuse)
    with pytest.raises(ArchivePathError) as info:
        save_archive(folder / "m", KIND, arrays, config)
    message = str(info.value)
    assert isinstance(info.value, OSError) and isinstance(info.value, lg.LingpError)
    assert repr(str(folder / "m")) in message and repr(str(folder)) in message and "not writable" in message
    assert "abc123" not in message and listing(folder) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_save_into_a_read_only_folder(tmp_path):
    arrays, config = synthetic()
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(ArchivePathError, match="not writable"):
            save_archive(folder / "m", KIND, arrays, config)
        assert listing(folder) == []
    finally:
        folder.chmod(0o755)


def test_load_of_a_missing_file_names_the_file_tried(tmp_path):
    with pytest.raises(ArchiveNotFoundError) as info:
        load_archive(tmp_path / "m", KIND)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, lg.LingpError)
    assert repr(str(tmp_path / "m.npz")) in str(info.value) and repr(str(tmp_path / "m")) in str(info.value)
    arrays, config = synthetic()
    save_archive(tmp_path / "other", KIND, arrays, config)
    os.rename(tmp_path / "other.npz", tmp_path / "renamed")  # an archive without its .npz: the hint says so
    with pytest.raises(ArchiveNotFoundError, match="a file .*renamed' exists, but archives are named with .npz"):
        load_archive(tmp_path / "renamed", KIND)


# ----- a failed or interrupted save leaves nothing ------------------------------------------------------------------

@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("boom")], ids=["interrupt", "disk-full", "error"])
@pytest.mark.parametrize("existing", [True, False], ids=["over-archive", "new"])
def test_interrupted_save_leaves_folder_and_old_archive_unchanged(tmp_path, monkeypatch, error, existing):
    arrays, config = synthetic()
    if existing:
        save_archive(tmp_path / "m", KIND, arrays, config)
    before = {name: (tmp_path / name).read_bytes() for name in listing(tmp_path)}
    savez = np.savez

    def half_then_fail(file, *args, **kwargs):
        # the real archive first, so the temporary file is non-empty when the failure strikes (mid-way)
        savez(file, *args, **kwargs)
        assert file.tell() > 0
        raise error

    monkeypatch.setattr(np, "savez", half_then_fail)
    new = {"a": arrays["a"] + 1.0}
    expected = ArchivePathError if isinstance(error, OSError) else type(error)
    with pytest.raises(expected) as info:
        save_archive(tmp_path / "m", KIND, new, config)
    if isinstance(error, OSError):
        assert "No space left" in str(info.value) and repr(str(tmp_path / "m")) in str(info.value)
    assert {name: (tmp_path / name).read_bytes() for name in listing(tmp_path)} == before  # no temp, old bytes
    monkeypatch.setattr(np, "savez", savez)
    if existing:
        np.testing.assert_array_equal(load_archive(tmp_path / "m", KIND)[0]["a"], arrays["a"])


def test_failed_rename_removes_the_temporary_file(tmp_path, monkeypatch):
    arrays, config = synthetic()
    save_archive(tmp_path / "m", KIND, arrays, config)
    old = (tmp_path / "m.npz").read_bytes()

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(io.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_archive(tmp_path / "m", KIND, {"a": np.zeros(2)}, config)
    assert listing(tmp_path) == ["m.npz"] and (tmp_path / "m.npz").read_bytes() == old


# ----- what save refuses to write -----------------------------------------------------------------------------------

@pytest.mark.parametrize("arrays, error, match", [
    ({"x": np.array([object(), 1], dtype=object)}, lg.DTypeError, "'x' has dtype object"),
    ({"x": np.array(["a", "bc"])}, lg.DTypeError, "'x' has dtype <U2"),
    ({"x": np.zeros(2, dtype=[("f", "f8")])}, lg.DTypeError, "'x' has dtype"),
    ({"x": np.array([1.0, np.nan, np.inf])}, lg.NonFiniteError, r"'x' \(shape \(3,\), float64\) holds 1 NaN and 1 Inf"),
    ({"x": np.array([1 + 1j, complex(0, np.inf)])}, lg.NonFiniteError, "'x'.*0 NaN and 1 Inf.*index \\(1,\\)"),
    ({"file": np.zeros(2)}, lg.InvalidOptionError, "'file' cannot be saved"),
    ({io._HEADER: np.zeros(2)}, lg.InvalidOptionError, "cannot be saved"),
    ({3: np.zeros(2)}, lg.InvalidOptionError, "array name 3"),
    ([np.zeros(2)], lg.ArgumentTypeError, "arrays must be a dict"),
])
def test_save_refuses_what_load_would_refuse(tmp_path, arrays, error, match):
    with pytest.raises(error, match=match):
        save_archive(tmp_path / "m", KIND, arrays, {})
    assert listing(tmp_path) == []


@pytest.mark.parametrize("kind, config, error, match", [
    (KIND, {"s": float("nan")}, lg.InvalidOptionError, "config cannot be written as JSON"),
    (KIND, {"s": object()}, lg.ArgumentTypeError, "config cannot be written as JSON"),
    (KIND, [1, 2], lg.ArgumentTypeError, "config must be a dict"),
    (None, {}, lg.ArgumentTypeError, "kind must be a str"),
])
def test_save_refuses_a_bad_header(tmp_path, kind, config, error, match):
    with pytest.raises(error, match=match):
        save_archive(tmp_path / "m", kind, {"a": np.zeros(2)}, config)
    assert listing(tmp_path) == []


# ----- what load refuses, even with recomputed checksums ------------------------------------------------------------

def test_every_array_is_checksummed(tmp_path):
    arrays, config = synthetic()
    path = save_archive(tmp_path / "m", KIND, arrays, config)
    contents = read_npz(path)
    for name in arrays:
        out = tmp_path / "edited.npz"
        np.savez(out, **dict(contents, **{name: changed_value(contents[name])}))
        with pytest.raises(ArchiveError, match=f"array '{name}' .*fails its checksum"):
            load_archive(out, KIND)


@pytest.mark.parametrize("value, match", [
    (np.array(["a", "b"]), "non-numeric dtype <U1"),
    (np.zeros(2, dtype=[("f", "f8"), ("g", "i4")]), "non-numeric dtype"),
    (np.array([1.0, np.nan]), r"holds 1 NaN and 0 Inf entries, the first at index \(1,\)"),
    (np.array([[1.0, 2.0], [np.inf, -np.inf]], dtype=np.float32),
     r"0 NaN and 2 Inf entries, the first at index \(1, 0\)"),
    (np.array([complex(np.nan, 0)]), "1 NaN"),
])
def test_load_refuses_non_numeric_or_non_finite_arrays(tmp_path, value, match):
    arrays, config = synthetic()
    path = save_archive(tmp_path / "m", KIND, arrays, config)
    out = rewrite(path, tmp_path / "edited.npz", arrays={"b": value})
    with pytest.raises(ArchiveError, match=f"array 'b' .*{match}"):
        load_archive(out, KIND)


def test_load_refuses_object_arrays_without_unpickling(tmp_path):
    arrays, config = synthetic()
    path = save_archive(tmp_path / "m", KIND, arrays, config)
    contents = read_npz(path)
    np.savez(tmp_path / "obj.npz", **dict(contents, b=np.array([{"x": 1}], dtype=object)))  # pickled by numpy
    with pytest.raises(ArchiveError, match="array 'b' holds Python objects"):
        load_archive(tmp_path / "obj.npz", KIND)


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.replace('"name": "synthetic"', '"name": NaN'), "not valid JSON"),
    (lambda t: json.dumps([1, 2]), r"not a lingp archive \(format 'list'\)"),
    (lambda t: "{", "not valid JSON"),
    # json reads 1e400 as Inf, which no saved header holds (and the config's checksum could not even be computed)
    (lambda t: t.replace('"n": 4', '"n": 1e400'), "1e400 .*beyond float64"),
    (lambda t: t.replace('"n": 4', '"n": -1e400'), "-1e400 .*beyond float64"),
])
def test_load_refuses_a_malformed_header(tmp_path, edit, match):
    arrays, config = synthetic()
    path = save_archive(tmp_path / "m", KIND, arrays, config)
    with pytest.raises(ArchiveError, match=match):
        load_archive(rewrite(path, tmp_path / "edited.npz", header=edit), KIND)


@pytest.mark.parametrize("config", [[1, 2], "text", None, 3.0])
def test_load_refuses_a_config_that_is_not_a_dict(tmp_path, config):
    arrays, _ = synthetic()
    path = save_archive(tmp_path / "m", KIND, arrays, {"n": 4})
    with pytest.raises(ArchiveError, match=f"configuration is a {type(config).__name__}, not a dict"):
        load_archive(rewrite(path, tmp_path / "edited.npz", config=config), KIND)


def test_load_refuses_other_files(tmp_path):
    np.save(tmp_path / "single.npy", np.zeros(3))
    os.rename(tmp_path / "single.npy", tmp_path / "single.npz")
    with pytest.raises(ArchiveError, match="single .npy array"):
        load_archive(tmp_path / "single.npz", KIND)
    np.savez(tmp_path / "header.npz", **{io._HEADER: np.zeros(2)})
    with pytest.raises(ArchiveError, match="header is a float64 array of shape"):
        load_archive(tmp_path / "header.npz", KIND)
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ArchiveError, match="not a readable lingp archive"):
        load_archive(tmp_path / "text.npz", KIND)


def test_load_refuses_arrays_added_or_removed(tmp_path):
    arrays, config = synthetic()
    path = save_archive(tmp_path / "m", KIND, arrays, config)
    contents = read_npz(path)
    np.savez(tmp_path / "more.npz", **dict(contents, extra=np.zeros(1)))
    with pytest.raises(ArchiveError, match="do not match the header"):
        load_archive(tmp_path / "more.npz", KIND)
    np.savez(tmp_path / "less.npz", **{k: a for k, a in contents.items() if k != "idx"})
    with pytest.raises(ArchiveError, match="do not match the header"):
        load_archive(tmp_path / "less.npz", KIND)


# ----- expected shapes and dtypes -----------------------------------------------------------------------------------

def expected_spec(config):
    """What a model declares for the synthetic archive (every form of spec once)."""
    return {"a": (("n", config["c"]), "f"), "b": (("n",), (np.float32,)), "idx": ((None,), "iu"),
            "mask": (lambda shape: len(shape) == 1, "b"), "task*_x": ((2, 2), "f"), "unused_*": ((9,), "c")}


def test_expected_accepts_a_matching_archive(tmp_path):
    arrays, config = synthetic()
    path = save_archive(tmp_path / "m", KIND, arrays, config)
    for expected in (expected_spec, expected_spec(config)):
        loaded, _ = load_archive(path, KIND, expected=expected)
        assert list(loaded) == list(arrays)


@pytest.mark.parametrize("name, value, match", [
    ("a", np.zeros((3, 3)), r"array 'b' has shape \(4,\) and dtype float32; the model expects shape \(n,\) with "
                            r"n = 3, as in array 'a'"),  # a binds n first; the disagreement names both arrays
    ("a", np.zeros((4, 2)), r"array 'a' has shape \(4, 2\) and dtype float64; the model expects shape \(n, 3\)"),
    ("a", np.zeros(12), r"array 'a' has shape \(12,\).*expects shape \(n, 3\)"),
    ("b", np.zeros(5, dtype=np.float32), r"array 'b' has shape \(5,\) and dtype float32; the model expects shape "
                                         r"\(n,\) with n = 4, as in array 'a'"),
    ("b", np.zeros(4), r"array 'b' has shape \(4,\) and dtype float64; the model expects dtype float32"),
    ("idx", np.arange(5.0), r"array 'idx' has shape \(5,\) and dtype float64; the model expects dtype kind 'iu'"),
    ("mask", np.ones((1, 2), dtype=bool), r"array 'mask' has shape \(1, 2\).*a shape accepted by .*<lambda>"),
    ("task1_x", np.zeros((2, 3)), r"array 'task1_x' has shape \(2, 3\).*expects shape \(2, 2\)"),
    ("idx", None, "the model needs an array 'idx', which the archive lacks"),
])
def test_expected_names_the_array_that_differs(tmp_path, name, value, match):
    """Each edit keeps the checksums consistent, so only ``expected`` can catch it."""
    arrays, config = synthetic()
    path = save_archive(tmp_path / "m", KIND, arrays, config)
    out = rewrite(path, tmp_path / "edited.npz", arrays={name: value})
    loaded, _ = load_archive(out, KIND)  # without expected the edit goes through: that is what expected is for
    assert (name in loaded) == (value is not None)
    with pytest.raises(ArchiveError, match=match):
        load_archive(out, KIND, expected=expected_spec)


@pytest.mark.parametrize("expected, error, match", [
    ({"a": ("n", "f")}, lg.ArgumentTypeError, r"expected\['a'\]: the shape must be"),
    ({"a": ((-1, 3), "f")}, lg.ArgumentTypeError, r"expected\['a'\]: the shape must be"),
    ({"a": ((True, 3), "f")}, lg.ArgumentTypeError, r"expected\['a'\]: the shape must be"),
    ({"a": ((4, 3),)}, lg.ArgumentTypeError, r"expected\['a'\] must be a \(shape, dtype\) pair"),
    ({"a": ((4, 3), "float64")}, lg.InvalidOptionError, "dtype kinds 'float64' must be letters"),
    ({"a": ((4, 3), "")}, lg.InvalidOptionError, "dtype kinds '' must be letters"),
    ({"a": ((4, 3), [object()])}, lg.ArgumentTypeError, r"expected\['a'\]: the dtype must be"),
    ({1: ((4, 3), "f")}, lg.ArgumentTypeError, "keys are array names"),
    ([("a", ((4, 3), "f"))], lg.ArgumentTypeError, "expected must be a mapping"),
    (lambda config: None, lg.ArgumentTypeError, "expected must be a mapping"),
])
def test_malformed_expected_is_a_clear_error(tmp_path, expected, error, match):
    arrays, config = synthetic()
    path = save_archive(tmp_path / "m", KIND, arrays, config)
    with pytest.raises(error, match=match):
        load_archive(path, KIND, expected=expected)


# ----- real model archives, tampered array by array -----------------------------------------------------------------

@pytest.fixture(scope="module")
def fitted_models():
    """Small fitted models whose archives hold every kind of array they save (factored and dense Jacobian blocks
    included: the LayerNorm exports a dense block)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.LayerNorm(5), torch.nn.Linear(5, 2))
    net = net.double()
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    J = lg.export_jacobian(net, x, backend="numpy")
    y = np.random.default_rng(2).standard_normal((6, 2))
    labels = np.array([0, 1, 1, 0, 1, 0])
    return [(lg.LinearizedGP(0.7, 0.05, method="function-cholesky").fit(J, y), True),
            (lg.LinearizedGP(0.7, 0.05, output_mode="independent", method="function-spectral").fit(J, y), True),
            (lg.LinearizedGP(0.7, 0.05, method="parameter-cholesky").fit(J, y), False),
            (LaplaceClassifier(0.8, method="function").fit(J, labels), True),
            (LaplaceClassifier(0.8, method="parameter").fit(J, labels), False)]


@pytest.mark.parametrize("index", range(5))
def test_every_array_of_a_model_archive_is_verified(tmp_path, fitted_models, index):
    model, has_jacobian = fitted_models[index]
    path = model.save(tmp_path / "model")
    contents = read_npz(path)
    names = [k for k in contents if k != io._HEADER]
    assert len(names) >= 2
    assert {"J_f0", "J_0_A", "J_0_delta", "J_1_values"} <= set(names) if has_jacobian else "J_f0" not in names
    clean, config = load_archive(path, type(model).__name__)
    for name in names:
        out = tmp_path / "edited.npz"
        # one value changed, header untouched: the checksum of that array (and no other) must catch it
        np.savez(out, **dict(contents, **{name: changed_value(contents[name])}))
        with pytest.raises(ArchiveError, match=f"array '{name}' .*fails its checksum"):
            type(model).load(out)
        # a reshaped array with recomputed checksums: caught once the model declares its shapes
        reshaped = np.concatenate([contents[name].reshape(-1)] * 2)
        rewrite(path, out, arrays={name: reshaped})
        expected = {k: (a.shape, (a.dtype,)) for k, a in clean.items()}
        with pytest.raises(ArchiveError, match=f"array '{name}' has shape \\({reshaped.size},\\)"):
            load_archive(out, type(model).__name__, expected=expected)
    loaded = type(model).load(path)  # the untouched archive still loads
    assert loaded.data_hash_ == model.data_hash_


def _edited_config(path):
    with np.load(path, allow_pickle=False) as z:
        return json.loads(str(z[io._HEADER]))["config"]


@pytest.mark.parametrize("edit", ["noise_groups_empty", "averaging_summary_missing", "alpha_epsilon_missing",
                                  "noise_a_float", "alpha_epsilon_negative", "noise_array_negative"])
def test_models_rebuilt_from_edited_configurations_raise_archive_errors(tmp_path, edit):
    """Configurations edited with their checksums recomputed: every inconsistency is an ArchiveError naming the file,
    never a KeyError, IndexError or AttributeError from inside the model."""
    from tests.test_dirichlet import classifier_problem

    torch.manual_seed(0)
    backend = lg.get_backend("numpy")
    J, _, labels, _ = classifier_problem(backend)
    if edit == "averaging_summary_missing":
        y = J.f0 + np.sin(np.arange(J.f0.size)).reshape(J.f0.shape)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", lg.NumericalWarning)
            model = lg.LinearizedGP(output_mode="trace").fit(J, y).average_hyperparameters(grid_size=5)
        cls = lg.LinearizedGP
    else:
        model, cls = lg.DirichletClassifier(0.5).fit(J, labels), lg.DirichletClassifier
    path = model.save(tmp_path / "model")
    config, arrays = _edited_config(path), None
    if edit == "noise_groups_empty":
        config["noise_groups"] = []
    elif edit == "averaging_summary_missing":
        del config["averaging"]["summary"]
    elif edit == "alpha_epsilon_missing":
        del config["settings"]["alpha_epsilon"]
    elif edit == "noise_a_float":
        config["noise"] = 0.5
    elif edit == "alpha_epsilon_negative":
        config["settings"]["alpha_epsilon"] = -1.0
    else:
        arrays = {"noise": -read_npz(path)["noise"]}
    edited = rewrite(path, tmp_path / "edited.npz", config=config, arrays=arrays)
    with pytest.raises(io.ArchiveError, match="edited.npz"):
        cls.load(edited)


def test_laplace_archive_with_impossible_per_block_scales_is_refused(tmp_path):
    from tests.test_dirichlet import classifier_problem

    torch.manual_seed(0)
    J, _, labels, _ = classifier_problem(lg.get_backend("numpy"))
    for method, scales in (("function", [1.0, 2.0]), ("parameter", [1.0, 2.0])):
        clf = lg.LaplaceClassifier(0.5, method=method).fit(J, labels)
        config = _edited_config(path := clf.save(tmp_path / method))
        config["prior_scale"] = scales  # function space takes one scale; this network has 3 blocks
        with pytest.raises(io.ArchiveError, match="per-block"):
            lg.LaplaceClassifier.load(rewrite(path, tmp_path / f"edited_{method}.npz", config=config))


@pytest.mark.parametrize("edit", ["flag_false", "flag_removed", "flag_a_string", "array_removed", "array_int",
                                  "array_nan"])
def test_a_weight_space_prior_mean_cannot_be_edited_out(tmp_path, edit):
    """LinearizedGP.fit(..., prior_mean=m) saves m and a flag; an archive whose flag and arrays disagree (checksums
    recomputed) is refused rather than loaded as another model that predicts differently."""
    from tests.test_gp import problem

    backend = lg.get_backend("numpy")
    J, Js, y, _ = problem(backend, np.random.default_rng(0))
    m = np.random.default_rng(1).standard_normal(J.p)
    path = lg.LinearizedGP(0.7, 0.05).fit(J, y, prior_mean=m).save(tmp_path / "model")
    config, arrays = _edited_config(path), None
    if edit in ("flag_false", "flag_a_string"):
        config["prior_mean"] = False if edit == "flag_false" else "yes"
    elif edit == "flag_removed":
        del config["prior_mean"]
    else:
        config = KEEP
        arrays = {"prior_mean": {"array_removed": None, "array_int": np.arange(J.p),
                                 "array_nan": np.full(J.p, np.nan)}[edit]}
    edited = rewrite(path, tmp_path / "edited.npz", arrays=arrays, config=config)
    with pytest.raises(ArchiveError):
        lg.LinearizedGP.load(edited)
    np.testing.assert_array_equal(lg.LinearizedGP.load(path).predict(Js),  # the untouched archive still loads
                                  lg.LinearizedGP(0.7, 0.05).fit(J, y, prior_mean=m).predict(Js))


def test_a_model_fitted_on_scaled_blocks_keeps_them_through_save_and_load(tmp_path):
    """The block weights of J.scale_blocks are part of the prior: the archived training Jacobian keeps them (it came
    back unscaled), and the loaded model refuses an unscaled J_star as the fitted one does."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).double()
    J = lg.export_jacobian(net, torch.randn(9, 3, dtype=torch.float64))
    J_star = lg.export_jacobian(net, torch.randn(4, 3, dtype=torch.float64))
    weights = [0.5, 2.0]
    y = J.f0 + np.random.default_rng(0).standard_normal(J.f0.shape)
    gp = lg.LinearizedGP(1.0, 0.1, method="function-cholesky").fit(J.scale_blocks(weights), y)
    loaded = lg.LinearizedGP.load(gp.save(tmp_path / "scaled"))
    assert loaded._J.block_weights == tuple(weights)
    for model in (gp, loaded):
        with pytest.raises(lg.SignatureError, match="scaled by blocks"):
            model.predict(J_star)
    np.testing.assert_array_equal(loaded.predict(J_star.scale_blocks(weights), return_var=True)[1],
                                  gp.predict(J_star.scale_blocks(weights), return_var=True)[1])


# ----- edited configurations and states (checksums recomputed): refused at load, at once ----------------------------

@pytest.fixture(scope="module")
def archived_models():
    """Small fitted models, one per archive layout the edits below need."""
    torch.manual_seed(0)
    x = torch.randn(9, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    net1 = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    J, J_star = lg.export_jacobian(net, x[:6], backend="numpy"), lg.export_jacobian(net, x[6:], backend="numpy")
    J1, J1_star = lg.export_jacobian(net1, x[:6], backend="numpy"), lg.export_jacobian(net1, x[6:], backend="numpy")
    rng = np.random.default_rng(3)
    y = J.f0 + rng.standard_normal(J.f0.shape)
    labels = np.array([0, 1, 1, 0, 1, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lg.NumericalWarning)  # averages whose weight reaches the grid's edge
        return {
            "gp_independent": lg.LinearizedGP(0.7, 0.05, output_mode="independent",
                                              method="function-cholesky").fit(J, y),
            "gp_output_noise": lg.LinearizedGP(0.7, [0.1, 0.2], method="parameter-cholesky").fit(J, y),
            "gp_observation_noise": lg.LinearizedGP(0.7, rng.uniform(0.1, 1.0, (6, 2)), output_mode="trace",
                                                    method="function-cholesky").fit(J, y),
            "gp_constant": lg.LinearizedGP(0.7, 0.05, mean="constant", method="function-cholesky").fit(J, y),
            "gp_averaged": lg.LinearizedGP(0.7, 0.05).fit(J, y).average_hyperparameters(grid_size=3),
            "laplace_function_averaged": LaplaceClassifier(0.8, likelihood="bernoulli", method="function").fit(
                J1, labels).average_prior_scale(grid_size=3),
            "laplace_function": LaplaceClassifier(0.8, method="function").fit(J, labels),
            "laplace_parameter": LaplaceClassifier(0.8, method="parameter").fit(J, labels),
            "dirichlet": lg.DirichletClassifier(0.5).fit(J, labels),
            "block_average": lg.BlockWeightAverage(levels=2, grid_size=3).fit(J, y),
            "J_star": J_star, "J1_star": J1_star,
        }


class _TooSlow(Exception):
    """A load still running after its time limit (not an ArchiveError: the test fails)."""


def load_at_once(cls, path, seconds: float = 10.0):
    """cls.load(path), interrupted after ``seconds``: a load that loops over an edited count fails the test instead of
    hanging it (a correct load takes milliseconds)."""
    def too_slow(signum, frame):
        raise _TooSlow(f"{cls.__name__}.load still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return cls.load(path)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def set_entry(config: dict, entry: tuple, value) -> dict:
    """``config`` with the entry at the path ``entry`` (keys and list indices) set to ``value`` (DELETE: removed)."""
    *parents, last = entry
    inner = config
    for key in parents:
        inner = inner[key]
    if value is DELETE:
        del inner[last]
    else:
        inner[last] = value
    return config


DELETE = object()


def edited_archive(tmp_path, model, entry=None, value=None, arrays=None):
    """``model``'s archive with the config entry set and the arrays replaced, the checksums recomputed."""
    path = model.save(tmp_path / "model")
    config = _edited_config(path)
    if entry is not None:
        config = set_entry(config, entry, value(config) if callable(value) else value)
    return rewrite(path, tmp_path / "edited.npz", config=config, arrays=arrays)


def test_the_untouched_archives_load_and_predict_as_saved(tmp_path, archived_models):
    """The control for the edits below: each unedited archive loads and predicts exactly as the fitted model."""
    for name, model in archived_models.items():
        if name.startswith("J"):
            continue
        loaded = load_at_once(type(model), model.save(tmp_path / name))
        J_star = archived_models["J1_star" if name == "laplace_function_averaged" else "J_star"]
        if isinstance(model, LaplaceClassifier):
            np.testing.assert_array_equal(loaded.predict_proba(J_star), model.predict_proba(J_star))
        else:
            for got, want in zip(loaded.predict(J_star, return_var=True), model.predict(J_star, return_var=True)):
                np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name, entry, value, match", [
    ("gp_independent", ("c",), 1e300, "'c'"),  # hung: one task per output, range(int(1e300))
    ("gp_independent", ("c",), 10**300, "'c'"),
    ("gp_independent", ("c",), True, "'c'"),
    ("gp_independent", ("c",), 3, "'c'"),  # a count, but not the signature's 2 outputs
    ("gp_independent", ("plan", "tasks"), 1, "tasks"),
    ("gp_output_noise", ("n",), 1e300, "'n'"),  # was OverflowError from np.tile(noise, n)
    ("gp_output_noise", ("n",), 10**300, "'n'"),
    ("gp_output_noise", ("n",), "6", "'n'"),
    ("gp_output_noise", ("n",), 7, "rows"),  # the plan's 12 rows are 6 examples × 2 outputs
    ("gp_output_noise", ("p",), 10**300, "'p'"),
    ("gp_output_noise", ("plan", "space"), "function", "space"),
    ("gp_output_noise", ("noise",), [0.1, 0.2, 0.3], "noise"),
    ("gp_observation_noise", ("noise_groups", 0), 1e300, "noise_groups"),  # hung: range(groups) factors
    ("gp_observation_noise", ("noise_groups", 0), 10**300, "noise_groups"),
    ("gp_observation_noise", ("noise_groups", 0), 3, "noise_groups"),  # more groups than the 2 target columns
    ("gp_averaged", ("averaging", "points"), 1e300, "points"),
    ("gp_averaged", ("averaging", "points"), lambda c: c["averaging"]["points"] + 1, "averaging_weights"),
    ("laplace_function_averaged", ("averaging", "points"), 1e300, "points"),  # hung: range(points) states
    ("laplace_function_averaged", ("averaging", "points"), 10**300, "points"),
    ("laplace_function_averaged", ("averaging", "points"), lambda c: c["averaging"]["points"] + 1,
     "mixture_weights"),
    ("laplace_function_averaged", ("plan", "rows"), 10**300, "rows"),
    ("laplace_parameter", ("plan", "p"), 10**300, "'plan.p'"),
    ("laplace_parameter", ("plan", "rows"), 7, "rows"),  # not a multiple of the 2 outputs
    ("dirichlet", ("noise_groups",), [1, 1], "noise_groups"),  # one per task: the trace mode has one
    ("block_average", ("components", 0, "c"), 1e300, "'c'"),
    ("block_average", ("components", 1, "averaging", "points"), 10**300, "points"),
], ids=lambda value: "f" if callable(value) else str(value)[:20])
def test_edited_counts_are_refused_before_any_loop(tmp_path, archived_models, name, entry, value, match):
    """Counts of the saved configuration (examples, outputs, parameters, grid points, noise groups, the plan's
    sizes) must be plain ints that agree with each other, with the signature and with the arrays: a huge one made
    load loop for ever or grow memory, a float raised OverflowError, a wrong one loaded a model that failed later."""
    model = archived_models[name]
    edited = edited_archive(tmp_path, model, entry, value)
    with pytest.raises(ArchiveError, match=match) as info:
        load_at_once(type(model), edited)
    assert "edited.npz" in str(info.value) and "modified" in str(info.value)


def test_a_parameter_space_model_loads_without_a_noise_vector_per_training_row(tmp_path, archived_models):
    """Weight space keeps no array of the training rows, so n is bounded by nothing saved: the loaded engines need the
    noise groups of a per-output σ², not an (n·c,) vector of it (n = 10¹² made load raise MemoryError, and n = 10⁹
    allocated 16 GB for minutes)."""
    model = archived_models["gp_output_noise"]
    path = model.save(tmp_path / "model")
    config = _edited_config(path)
    config["n"], config["plan"]["rows"] = 10**12, 2 * 10**12  # consistent: n examples × 2 outputs
    loaded = load_at_once(lg.LinearizedGP, rewrite(path, tmp_path / "edited.npz", config=config))
    assert loaded.n_ == 10**12
    J_star = archived_models["J_star"]
    for got, want in zip(loaded.predict(J_star, return_var=True), model.predict(J_star, return_var=True)):
        np.testing.assert_array_equal(got, want)  # the same posterior: n enters no prediction in weight space


@pytest.mark.parametrize("name", ["gp_independent", "gp_observation_noise", "laplace_function",
                                  "laplace_function_averaged", "dirichlet"])
def test_a_function_space_archive_needs_its_training_jacobian(tmp_path, archived_models, name):
    """Function space predicts through the training Jacobian's kernel: without it (config jacobian null) the model
    loaded and every predict raised a ValueError or AttributeError from inside."""
    model = archived_models[name]
    with pytest.raises(ArchiveError, match="jacobian") as info:
        load_at_once(type(model), edited_archive(tmp_path, model, ("jacobian",), None))
    assert "function" in str(info.value) and "modified" in str(info.value)


@pytest.mark.parametrize("name, array, dtype", [
    ("gp_constant", "constant", np.int64),  # predict raised UFuncTypeError adding float64 into it
    ("gp_output_noise", "task0_mu", np.float32),
    ("gp_observation_noise", "noise", np.float32),
    ("laplace_parameter", "state_w", np.int64),
    ("laplace_function_averaged", "point1_state_a", np.float32),
    ("block_average", "m0_constant", np.int32),
])
def test_float64_state_stored_in_another_dtype_is_refused(tmp_path, archived_models, name, array, dtype):
    """Every state array is saved in float64 (the Jacobian's f0 in the Jacobian's dtype): another dtype, even another
    float, means the file was modified."""
    model = archived_models[name]
    path = model.save(tmp_path / "model")
    edited = rewrite(path, tmp_path / "edited.npz", arrays={array: read_npz(path)[array].astype(dtype)})
    with pytest.raises(ArchiveError, match=f"array '{array}' .*float64"):
        load_at_once(type(model), edited)


@pytest.mark.parametrize("name, entry", [("laplace_parameter", "log_evidence"),
                                         ("laplace_function_averaged", "log_evidence"),
                                         ("gp_independent", "lml"), ("block_average", "log_evidence")])
@pytest.mark.parametrize("value", ["x", [1, 2], {}, True, None])
def test_the_saved_evidence_must_be_a_finite_number(tmp_path, archived_models, name, entry, value):
    """log_evidence (a GP's lml may also be null: it overflowed when saved) is returned as saved: anything but a
    finite number made log_marginal_likelihood raise ValueError or TypeError, or return True as the evidence."""
    model = archived_models[name]
    if value is None and entry == "lml":
        loaded = load_at_once(type(model), edited_archive(tmp_path, model, (entry,), None))
        with pytest.raises(lg.NonFiniteError, match="overflow"):  # null: said why when asked, as before
            loaded.log_marginal_likelihood()
        return
    with pytest.raises(ArchiveError, match=entry):
        load_at_once(type(model), edited_archive(tmp_path, model, (entry,), value))


SIGNATURE_EDITS = [("blocks", 2), ("blocks", "x"), ("blocks", [["x"]]), ("blocks", [[["w"], [[-1]]]]),
                   ("blocks", lambda s: [[names, shapes + [[1]]] for names, shapes in s["blocks"]]),
                   ("outputs", "x"), ("outputs", [0.5, 1]), ("dtype", "float16"), ("dtype", None),
                   ("weights", 3), ("block_weights", [1.0]), ("block_weights", "x"), ("blocks", DELETE)]


@pytest.mark.parametrize("name, where", [("gp_independent", ("signature",)), ("laplace_parameter", ("signature",)),
                                         ("laplace_function", ("signature",)), ("dirichlet", ("signature",)),
                                         ("block_average", ("signature",)),
                                         ("block_average", ("components", 1, "signature"))])
def test_a_malformed_signature_is_refused_at_load(tmp_path, archived_models, name, where):
    """The signature every predict checks J_star against: malformed, it raised TypeError or ValueError inside every
    predict (or, with other block shapes or dtype, refused every J_star)."""
    model = archived_models[name]
    path = model.save(tmp_path / "model")
    for key, value in SIGNATURE_EDITS + [(None, "not a dict")]:
        config = _edited_config(path)
        if key is None:
            set_entry(config, where, value)
        else:
            signature = functools.reduce(lambda inner, k: inner[k], where, config)  # edited in place
            set_entry(signature, (key,), value(signature) if callable(value) else value)
        edited = rewrite(path, tmp_path / "edited.npz", config=config)
        with pytest.raises(ArchiveError, match="signature") as info:
            load_at_once(type(model), edited)
        assert "modified" in str(info.value), (key, value)


def test_an_average_saved_before_it_kept_its_signature_still_loads(tmp_path, archived_models):
    """BlockWeightAverage archives without their own signature (older ones) fall back to a component's."""
    model = archived_models["block_average"]
    loaded = load_at_once(lg.BlockWeightAverage, edited_archive(tmp_path, model, ("signature",), DELETE))
    assert loaded._signature == loaded.models_[0]._signature


@pytest.mark.parametrize("name, array", [
    ("gp_output_noise", "task0_factor0"), ("gp_independent", "task1_factor0"),
    ("gp_observation_noise", "task0_factor1"), ("dirichlet", "task0_factor0"),
    ("laplace_function", "state_factor"), ("laplace_function_averaged", "point1_state_factor"),
    ("laplace_parameter", "state_inverse_factor"),
])
@pytest.mark.parametrize("edit", ["zeros", "one_zero_pivot", "negative_pivot"])
def test_a_cholesky_factor_without_a_positive_diagonal_is_refused(tmp_path, archived_models, name, array, edit):
    """Saved triangular factors (L of a Cholesky, or R⁻¹) have a positive diagonal; a zero one made every predict raise
    scipy's LinAlgError (singular matrix)."""
    model = archived_models[name]
    path = model.save(tmp_path / "model")
    contents = read_npz(path)
    assert array in contents, sorted(contents)
    factor = contents[array].copy()
    if edit == "zeros":
        factor[:] = 0.0
    else:
        factor[1, 1] = 0.0 if edit == "one_zero_pivot" else -factor[1, 1]
    edited = rewrite(path, tmp_path / "edited.npz", arrays={array: factor})
    with pytest.raises(ArchiveError, match=f"array '{array}'.*diagonal"):
        load_at_once(type(model), edited)


@pytest.mark.parametrize("name, array", [("laplace_function_averaged", "point0_state_factors"),
                                         ("laplace_function_averaged", "state_factors"),
                                         ("laplace_function", "state_factors")])
def test_function_space_laplace_curvature_factors_have_one_per_example(tmp_path, archived_models, name, array):
    """L (n, c, c) has one c × c factor per training example: one row short, every predict raised a reshape
    ValueError."""
    model = archived_models[name]
    path = model.save(tmp_path / "model")
    edited = rewrite(path, tmp_path / "edited.npz", arrays={array: read_npz(path)[array][:-1]})
    with pytest.raises(ArchiveError, match=f"array '{array}' has shape"):
        load_at_once(type(model), edited)
