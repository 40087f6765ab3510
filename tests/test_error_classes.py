"""Every exception lingp raises on purpose is a LingpError (README: "every error is a LingpError").

An AST scan of lingp_core/ and backends/: each ``raise X(...)`` / ``raise X`` must name a LingpError subclass,
resolved in the module's own namespace (aliases such as ``v.ShapeError`` included), or a factory function whose
return annotation is one. Allowed besides: a bare ``raise``; re-raising an object caught by an ``except ... as name``
of the same function; NotImplementedError in a stub method (body: docstring and the raise only, or
``@abstractmethod``); warnings; SystemExit in a ``__main__.py`` (a command line's exit); and numpy.linalg.LinAlgError
in backends/, the linalg contract the backends share with NumPy and CuPy, which lingp_core's Cholesky turns into
NotPositiveDefiniteError or jitter. The failure lists file:line and the class of each offending raise.
"""
from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import typing
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lingp_core._validate import LingpError

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lingp_core", "backends")


def source_files() -> Iterator[Path]:
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(expr: ast.expr, namespace: dict) -> object | None:
    """The object a Name or dotted Attribute names in ``namespace`` (None when it names nothing there)."""
    if isinstance(expr, ast.Name):
        return namespace.get(expr.id, getattr(builtins, expr.id, None))
    if isinstance(expr, ast.Attribute):
        owner = resolve(expr.value, namespace)
        return getattr(owner, expr.attr, None) if owner is not None else None
    return None


def is_stub(function: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """An abstract method: decorated @abstractmethod, or a body of (a docstring and) one raise."""
    if any(ast.unparse(d).endswith("abstractmethod") for d in function.decorator_list):
        return True
    body = function.body[1:] if ast.get_docstring(function) is not None else function.body
    return len(body) == 1 and isinstance(body[0], ast.Raise)


def caught_names(function: ast.AST | None) -> set[str]:
    """Names bound by ``except ... as name`` anywhere in ``function`` (the module when None)."""
    if function is None:
        return set()
    return {h.name for h in ast.walk(function) if isinstance(h, ast.ExceptHandler) and h.name}


def raised_class(exc: ast.expr, namespace: dict) -> tuple[object | None, str]:
    """The class a raise statement raises (None if it cannot be told) and how the source names it."""
    target = exc.func if isinstance(exc, ast.Call) else exc
    obj = resolve(target, namespace)
    if inspect.isclass(obj):
        return obj, ast.unparse(target)
    if callable(obj) and isinstance(exc, ast.Call):  # a factory: judged by its return annotation
        returned = typing.get_type_hints(obj).get("return")
        if inspect.isclass(returned):
            return returned, f"{ast.unparse(target)}() -> {returned.__name__}"
    return None, ast.unparse(target)


def allowed(cls: object, path: Path, in_stub: bool) -> bool:
    if not inspect.isclass(cls):
        return False
    if issubclass(cls, (LingpError, Warning)):
        return True
    if cls is NotImplementedError and in_stub:
        return True
    if cls is SystemExit and path.name == "__main__.py":
        return True
    return issubclass(cls, np.linalg.LinAlgError) and path.relative_to(ROOT).parts[0] == "backends"


def local_imports(function: ast.AST | None) -> dict:
    """Names imported inside ``function`` (``from lingp_core._validate import X`` where a module-level import would
    be circular): they resolve like the module's own. Optional packages missing here (CuPy on a CPU machine) bind
    nothing: a raise that needed them stays unresolved and is reported."""
    names: dict = {}
    for node in ast.walk(function) if function is not None else ():
        try:
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                module = importlib.import_module(node.module)
                names.update({a.asname or a.name: getattr(module, a.name, None) for a in node.names})
            elif isinstance(node, ast.Import):
                for a in node.names:  # `import x.y as z` binds x.y to z, `import x.y` binds x
                    names[a.asname or a.name.split(".")[0]] = importlib.import_module(a.name if a.asname else
                                                                                      a.name.split(".")[0])
        except ImportError:
            continue
    return names


def scan(tree: ast.Module, namespace: dict, path: Path) -> list[str]:
    """file:line and the class of every raise in ``tree`` that is not allowed (see the module docstring)."""
    problems = []
    functions = [f for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for node in ast.walk(tree):
        if not isinstance(node, ast.Raise) or node.exc is None:
            continue
        around = [f for f in functions if f.lineno <= node.lineno <= (f.end_lineno or f.lineno)]
        enclosing = min(around, key=lambda f: (f.end_lineno or f.lineno) - f.lineno, default=None)
        exc = node.exc
        base = exc.func.value if isinstance(exc, ast.Call) and isinstance(exc.func, ast.Attribute) else exc
        if isinstance(base, ast.Name) and base.id in caught_names(enclosing):
            continue  # the caught object again (or its .with_traceback(...))
        scope = dict(namespace)
        for function in sorted(around, key=lambda f: f.lineno):  # outer functions first, the innermost last
            scope.update(local_imports(function))
        cls, named = raised_class(exc, scope)
        if not allowed(cls, path, enclosing is not None and is_stub(enclosing)):
            what = cls.__name__ if inspect.isclass(cls) else "not resolved to a class"
            problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: raise {named} ({what})")
    return problems


def test_every_raise_is_a_lingp_error():
    problems = []
    for path in source_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        problems += scan(tree, vars(importlib.import_module(module_name(path))), path)
    assert not problems, ("raises that are not LingpError subclasses (use the classes in lingp_core/_validate.py):\n"
                          + "\n".join(problems))


def test_the_scan_flags_plain_errors_and_accepts_the_allowed_forms():
    code = '''
import lingp_core._validate as v
def bad():
    raise ValueError("x")
def reraise(x):
    try:
        pass
    except OSError as exc:
        raise exc
    raise v.ShapeError("x")
def lazy():
    from lingp_core._validate import DTypeError
    raise DTypeError("x")
def stub():
    """Overridden."""
    raise NotImplementedError
def not_a_stub(x):
    x += 1
    raise NotImplementedError
'''
    tree = ast.parse(code)
    namespace: dict = {}
    exec(compile(tree, "<scan>", "exec"), namespace)  # noqa: S102 - the fixed snippet above
    problems = scan(tree, namespace, ROOT / "lingp_core" / "snippet.py")
    assert problems == ["lingp_core/snippet.py:4: raise ValueError (ValueError)",
                        "lingp_core/snippet.py:19: raise NotImplementedError (NotImplementedError)"]
