"""Triangle copies of square matrices (NumPy or CuPy), a tile of rows at a time: no n × n temporaries or index
arrays."""
from __future__ import annotations

from typing import Any

TILE = 1024  # rows per pass: a transposed 1024-row tile read stays in cache


def fill_lower(out: Any, source: Any, scale: float, xp: Any) -> None:
    """out's strict lower triangle ← scale · (source's strict upper triangle)ᵀ, a tile of rows at a time (out may be
    source: the two triangles do not overlap). The products are taken in out's dtype (a float32 source times a float64
    scale is not rounded to float32 first)."""
    n = out.shape[0]
    for i in range(0, n, TILE):
        rows = slice(i, min(i + TILE, n))
        xp.multiply(source[:i, rows].T, scale, out=out[rows, :i], dtype=out.dtype)
        upper = xp.triu(source[rows, rows], 1)
        block = out[rows, rows]
        lower = xp.tril(xp.ones(block.shape, dtype=bool), -1)
        xp.copyto(block, xp.multiply(upper.T, scale, dtype=out.dtype), where=lower)


def clear_upper(a: Any, xp: Any) -> None:
    """a's strict upper triangle ← 0, a tile of rows at a time."""
    n = a.shape[0]
    for i in range(0, n, TILE):
        rows = slice(i, min(i + TILE, n))
        a[rows, i + TILE:] = 0.0
        a[rows, rows] = xp.tril(a[rows, rows])
