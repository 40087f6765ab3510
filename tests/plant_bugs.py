"""Plant plausible bugs in the subtle code, one at a time, and check that the tests meant for each catch it.

Run from the repository root: ``python tests/plant_bugs.py``. Each line says CAUGHT (a test failed, named) or
MISSED; the exit status is 1 if any bug was missed. Every file is restored afterwards, also on Ctrl-C.
Not a pytest module (it edits the source tree); the suite's own tests are what it exercises.
"""
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MUTANTS = [
    ("CG skips its true-residual check", "lingp_core/solvers/cg.py",
     "accepted = true_norms <= thresholds[act[candidates]]", "accepted = true_norms >= 0", ["tests/test_cg.py"]),
    ("kernel accumulates in the Jacobian's float32", "lingp_core/kernels.py",
     "return [b.select(examples, output, dtype) for b in J.blocks]",
     "return [b.select(examples, output, J.dtype) for b in J.blocks]", ["tests/test_kernels.py"]),
    ("kernel_dtype='float32' ignored", "lingp_core/_posterior.py",
     "dtype=settings.kernel_dtype", "dtype='float64'", ["tests/test_contract.py", "tests/test_gp.py"]),
    ("archive checksum skips one array", "lingp_core/io.py",
     "    for name, array in contents.items():\n        if _digest(array) != checksums[name]:",
     "    for name, array in list(contents.items())[:-1]:\n        if _digest(array) != checksums[name]:",
     ["tests/test_io.py"]),
    ("SLQ standard error not divided by sqrt(probes)", "lingp_core/solvers/logdet.py",
     "estimates.std(ddof=1) / np.sqrt(num_probes)", "estimates.std(ddof=1)", ["tests/test_lanczos_logdet.py"]),
    ("SLQ log-det normalised by n - 1", "lingp_core/solvers/logdet.py",
     "out[row, j] = n * float(", "out[row, j] = (n - 1) * float(", ["tests/test_lanczos_logdet.py"]),
    ("exported Jacobian scaled by 1.01", "lingp_core/export.py",
     "    return JacobianBlocks(f0, blocks, backend=be, outputs=index,",
     "    for _b in blocks:\n        if hasattr(_b, 'values'):\n            _b.values *= 1.01\n        else:\n"
     "            _b.delta *= 1.01\n    return JacobianBlocks(f0, blocks, backend=be, outputs=index,",
     ["tests/test_laplace.py"]),
]
env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
missed = 0
for name, path, old, new, tests in MUTANTS:
    full = os.path.join(ROOT, path)
    backup = full + ".orig"
    shutil.copy(full, backup)
    try:
        text = open(full).read()
        assert text.count(old) >= 1, (name, "pattern not found")
        open(full, "w").write(text.replace(old, new, 1))
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                           cwd=ROOT, env=env, capture_output=True, text=True)
        failed = [line for line in r.stdout.splitlines() if line.startswith("FAILED")]
        missed += r.returncode == 0
        print(f"{name}: {'CAUGHT' if r.returncode else 'MISSED'} by {failed[:1] or r.stdout.splitlines()[-1:]}",
              flush=True)
    finally:
        shutil.move(backup, full)
sys.exit(1 if missed else 0)
