"""Pieces the benchmark scripts share: the paper's MLP and an optional matplotlib."""
from __future__ import annotations

from typing import Any

PAPER_WIDTHS = (5, 200, 2000, 200, 1)  # the speed-test MLP of Maddox et al. (2021): p = 803,601 with ELU


def paper_mlp(n: int, device: str, widths: tuple[int, ...] = PAPER_WIDTHS, seed: int = 0) -> tuple[Any, Any]:
    """A seeded ELU MLP of the given widths in eval mode and n seeded standard-normal inputs, on ``device``."""
    import torch

    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(torch.nn.ELU())
    model = torch.nn.Sequential(*layers).to(device).eval()
    x = torch.randn(n, widths[0], generator=torch.Generator().manual_seed(seed + 1)).to(device)
    return model, x


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def machine_info(backend_name: str) -> dict:
    """What a reader needs to compare numbers: Python, platform, CPU model and count, library versions, BLAS core
    type override and threads, torch's threads, and the GPU name on CuPy."""
    import os
    import platform

    import numpy as np

    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpu_count": os.cpu_count(), "numpy": np.__version__, "backend": backend_name,
                            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE")}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        pass
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        pass
    else:  # the BLAS libraries' threads where this is called (run_repro limits them to --torch-threads)
        info["blas_threads"] = max((pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"),
                                   default=None)
    try:
        import torch
    except ImportError:
        return info
    info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    if backend_name == "cupy" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def save_figure(fig: Any, path: Any) -> None:
    """Legend, tight layout, 120 dpi PNG, and the figure closed (pyplot keeps every open figure alive)."""
    import matplotlib.pyplot as plt

    fig.axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def repro_parser(name: str, description: str) -> Any:
    """The command line every reproduction script shares: --backend, --quick, --seed, --out (default
    benchmarks/results/<name>) and --torch-threads; scripts add their own options to the returned parser."""
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("numpy", "cupy"), default="numpy",
                        help="where lingp's arrays live; cupy also puts the torch model on CUDA (default numpy)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes that run in seconds (the smoke tests)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, networks and training (default 0)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / name,
                        help="folder for the JSON and PNG (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (bars go to stderr)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch CPU threads, and NumPy/SciPy BLAS threads alike (default 1: on networks this "
                             "small, thread hand-offs cost more than they save, badly so on a shared machine)")
    return parser


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table of already formatted cells, so a printed table pastes into README.md unchanged."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def save_results(out: Any, stem: str, result: dict, plot: Any) -> None:
    """Write ``stem``.json and, through ``plot(result, path) -> bool`` (False without matplotlib), ``stem``.png under
    ``out``, printing each path written."""
    import json

    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / (stem + '.json')}")
    if plot(result, out / f"{stem}.png"):
        print(f"wrote {out / (stem + '.png')}")


def run_repro(script: str, argv: list[str] | None, args: Any, run: Any, headline: Any, table: Any, plot: Any,
              stem: str) -> int:
    """The main of every reproduction script: record the command line, ``run(args)``, print ``headline(result)``
    and ``table(result)``, and save ``stem`` (+ "_quick") .json/.png under ``args.out``."""
    args.command = command_line(script, argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with blas_threads(args.torch_threads):  # lingp's NumPy work gets the CPU threads torch's baselines get
        result = run(args)
    print(headline(result))
    print(table(result))
    save_results(args.out, stem + ("_quick" if args.quick else ""), result, plot)
    return 0


def progress(items: Any, *, enabled: bool, desc: str, total: int | None = None) -> Any:
    """``items`` wrapped in a tqdm bar on stderr when ``enabled`` and tqdm is installed, else ``items`` itself."""
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, total=total, leave=False)


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that reproduces this run, as typed from the repository root (argv None: this process's)."""
    import os
    import shlex
    import sys

    argv = sys.argv[1:] if argv is None else argv

    return " ".join(["python", f"benchmarks/{os.path.basename(script)}"] + [shlex.quote(a) for a in argv])


def blas_threads(threads: int) -> Any:
    """A context limiting the BLAS/LAPACK threads of NumPy and SciPy to ``threads`` (threadpoolctl, installed with
    scikit-learn; without it, a context that changes nothing): torch's baselines run on --torch-threads, so lingp's
    NumPy work gets as many, and on a shared machine the small eigendecompositions of these scripts slow down, not up,
    with a second BLAS thread."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib

        return contextlib.nullcontext()
    import scipy.linalg  # noqa: F401  SciPy's own BLAS: a library loaded after the limit would escape it

    return threadpool_limits(limits=threads, user_api="blas")


def set_torch_threads(threads: int) -> None:
    """Set torch's intra-op CPU threads (the scripts' --torch-threads)."""
    import torch

    if threads < 1:
        from lingp_core import ValueRangeError

        raise ValueRangeError(f"--torch-threads must be ≥ 1, got {threads}")
    torch.set_num_threads(threads)
