"""Few-label classification on the main job's data: which lingp classifier, and which way of choosing its
hyperparameters (issue 15's study; its table is in benchmarks/README.md).

For each seed (a source network and target shift of ``python -m lingp_core.demo --seed S``), each label budget and
each of 3 draws of the labelled images (the demo's draws), every variant below is fitted on the same labelled images
and scored on the seed's rotated test images (accuracy, NLL, ECE); the table is the mean over seeds × draws.

  onehot-evidence / -loo / -map / -average   LinearizedGP on centred one-hot labels (mean="zero", output mode
                                             "trace"), s and σ² by the marginal likelihood, leave-one-out, the
                                             "data" hyperprior (MAP), or averaged over a log grid (no hyperprior);
                                             class probabilities P(score k largest) under N(mean, var + σ²)
  dirichlet[-eps E] [-MODE] [-network]       DirichletClassifier (α_ε = 0.01 unless E, output mode "trace" unless
                                             MODE; "-network": LinearizedGP on the same targets and noise with the
                                             network's logits as the prior mean instead of a constant)
  fine-tune, laplace                         the demo's full fine-tuning and LaplaceClassifier rows
  linearized-fine-tune[-lr L]                the demo's fine-tuning recipe (full-batch Adam, 50 steps, lr 1e-2 unless
                                             L, cross-entropy) applied to the network's first-order Taylor expansion
                                             f(x; θ̂) + J(x)(θ − θ̂) (torch.func.jvp, independent of lingp): what a
                                             model linear in θ around the source weights reaches with fine-tuning's
                                             own recipe, the ceiling lingp's kernel is measured against
  oracle-dirichlet-s                         ORACLES, which read the TEST labels (ceilings, not methods): the
  oracle-dirichlet-blocks                    Dirichlet GP at the prior scale of ORACLE_SCALES with the best test
  oracle-any-lingp                           accuracy; with per-block prior weights (one block at 10⁻¹/10⁻²/10⁻³ of
                                             the others, relative to its mean kernel diagonal; s by the evidence)
                                             picked the same way; and, per draw, the best test accuracy of every
                                             lingp row above (variants and oracles): what no choice of
                                             hyperparameters, kernel weighting or criterion among these can beat

Usage: python benchmarks/study_few_labels.py [--seeds 0 1 2] [--budgets 1 2 5 10] [--repeats 3] [--quick] [--out DIR]
       python benchmarks/study_few_labels.py --tables results/study_few_labels/study_few_labels.json  (a saved run)
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import lingp_core as lg  # noqa: E402
from benchmarks._baselines import linearized  # noqa: E402
from lingp_core.demo import baselines, data, network, transfer  # noqa: E402
from lingp_core.demo.experiment import _score  # noqa: E402


def _onehot(J, labels, J_test, choice):
    targets = np.eye(J.n_outputs)[labels] - 1.0 / J.n_outputs
    gp = lg.LinearizedGP(mean="zero", output_mode="trace").fit(J, targets)
    if choice == "average":
        gp.average_hyperparameters()
        noise = float(np.dot(gp.mixture_.weights, gp.mixture_.noises))
    else:
        gp.optimize_hyperparameters(criterion="loo" if choice == "loo" else "evidence",
                                    hyperprior="data" if choice == "map" else None)
        noise = float(gp.noise)
    mean, var = gp.predict(J_test, return_var=True)
    return lg.probability_of_largest(mean, var + noise)


def _dirichlet(J, labels, J_test, alpha_epsilon=0.01, mode="trace", network_mean=False):
    if network_mean:
        targets, noise = lg.dirichlet_targets(labels, J.n_outputs, alpha_epsilon)
        gp = lg.LinearizedGP(1.0, noise, mean="network", output_mode=mode).fit(J, targets)
        gp.optimize_hyperparameters()
        return lg.probability_of_largest(*gp.predict(J_test, return_var=True))
    clf = lg.DirichletClassifier(alpha_epsilon=alpha_epsilon, output_mode=mode).fit(J, labels)
    return clf.optimize_prior_scale().predict_proba(J_test)


VARIANTS = {
    "onehot-evidence": lambda J, y, Jt: _onehot(J, y, Jt, "evidence"),
    "onehot-loo": lambda J, y, Jt: _onehot(J, y, Jt, "loo"),
    "onehot-map": lambda J, y, Jt: _onehot(J, y, Jt, "map"),
    "onehot-average": lambda J, y, Jt: _onehot(J, y, Jt, "average"),
    "dirichlet": lambda J, y, Jt: _dirichlet(J, y, Jt),
    "dirichlet-eps0.003": lambda J, y, Jt: _dirichlet(J, y, Jt, alpha_epsilon=0.003),
    "dirichlet-eps0.03": lambda J, y, Jt: _dirichlet(J, y, Jt, alpha_epsilon=0.03),
    "dirichlet-independent": lambda J, y, Jt: _dirichlet(J, y, Jt, mode="independent"),
    "dirichlet-full": lambda J, y, Jt: _dirichlet(J, y, Jt, mode="full"),
    "dirichlet-network": lambda J, y, Jt: _dirichlet(J, y, Jt, network_mean=True),
    "laplace": lambda J, y, Jt: transfer.laplace_classifier(J, y, Jt)[0],
}


#: prior scales the oracle-dirichlet-s row tries (the evidence's choice is ≈ 0.01 at every budget)
ORACLE_SCALES = 10.0 ** np.arange(-4.0, 1.01, 0.5)
ORACLE_BLOCK_LEVELS = (0.1, 0.01, 0.001)


def _best_by_accuracy(candidates: list[np.ndarray], y_test: np.ndarray) -> np.ndarray:
    """The class probabilities with the highest test accuracy (ties: the lowest test NLL)."""
    scores = [_score(p, y_test) for p in candidates]
    return candidates[min(range(len(scores)), key=lambda i: (-scores[i]["accuracy"], scores[i]["nll"]))]


def _oracle_scale(J, labels, J_test, y_test):
    return _best_by_accuracy([lg.DirichletClassifier(s).fit(J, labels).predict_proba(J_test) for s in ORACLE_SCALES],
                             y_test)


def _oracle_blocks(J, labels, J_test, y_test):
    blocks = len(J.blocks)
    one_hot = [[1.0 if i == b else 1e-30 for i in range(blocks)] for b in range(blocks)]
    sizes = np.array([float(np.mean(lg.kernel_diag(J_test.scale_blocks(w), output_mode="trace"))) for w in one_hot])
    grid = [np.ones(blocks)] + [np.where(np.arange(blocks) == b, level, 1.0)
                                for b in range(blocks) for level in ORACLE_BLOCK_LEVELS]
    candidates = []
    for w in grid:
        weights = w / sizes * sizes.mean()  # relative to each block's own kernel size
        clf = lg.DirichletClassifier().fit(J.scale_blocks(weights), labels).optimize_prior_scale()
        candidates.append(clf.predict_proba(J_test.scale_blocks(weights)))
    return _best_by_accuracy(candidates, y_test)


ORACLES = {"oracle-dirichlet-s": _oracle_scale, "oracle-dirichlet-blocks": _oracle_blocks}


def linearized_fine_tuning(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, test_x: torch.Tensor, *,
                           lr: float = baselines.FINE_TUNE_LR, steps: int = baselines.FINE_TUNE_STEPS) -> np.ndarray:
    """Class probabilities on ``test_x`` of f(·; θ̂) + J(·)δ (benchmarks._baselines.linearized), δ trained from 0 by
    the demo's fine-tuning loop: full-batch Adam on cross-entropy."""
    tuned = network.fine_tune(linearized(model), x, y, steps=steps, lr=lr)
    return network.predict_proba(tuned, test_x)


def run_seed(seed: int, budgets: list[int], repeats: int) -> list[dict]:
    domains = data.load_domains(seed, pool_per_class=max(20, max(budgets)))
    t = torch.from_numpy
    model = network.train_source(t(domains.source_train_x), t(domains.source_train_y), seed=seed, progress=False)
    model64 = copy.deepcopy(model).double()
    test_x, pool_x, pool_y = t(domains.test_x), t(domains.pool_x), t(domains.pool_y)
    J_test = lg.export_jacobian(model64, test_x.double())
    rows = []
    for k in budgets:
        for rep in range(repeats):
            chosen = data.few_shot_indices(domains.pool_y, k, np.random.default_rng([seed, k, rep]))  # the demo's
            labels = domains.pool_y[chosen]
            J = lg.export_jacobian(model64, pool_x[chosen].double())
            probs = {"fine-tune": baselines.full_fine_tuning(model, pool_x[chosen], pool_y[chosen], test_x,
                                                             seed=seed + rep)[0],
                     "linearized-fine-tune": linearized_fine_tuning(model, pool_x[chosen], pool_y[chosen], test_x),
                     "linearized-fine-tune-lr0.001": linearized_fine_tuning(model, pool_x[chosen], pool_y[chosen],
                                                                            test_x, lr=1e-3)}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", lg.NumericalWarning)  # bound hits are part of what is measured
                probs.update({name: fit(J, labels, J_test) for name, fit in VARIANTS.items()})
                probs.update({name: oracle(J, labels, J_test, domains.test_y) for name, oracle in ORACLES.items()})
            lingp = [p for name, p in probs.items() if name in VARIANTS or name in ORACLES]
            probs["oracle-any-lingp"] = _best_by_accuracy(lingp, domains.test_y)
            for name, p in probs.items():
                rows.append({"seed": seed, "labels_per_class": k, "repeat": rep, "variant": name,
                             **_score(p, domains.test_y)})
        print(f"seed {seed}: {k} labels per class done", flush=True)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        for k in sorted({r["labels_per_class"] for r in rows}):
            picked = [r for r in rows if r["variant"] == variant and r["labels_per_class"] == k]
            out.append({"variant": variant, "labels_per_class": k, "runs": len(picked),
                        **{m: float(np.mean([r[m] for r in picked])) for m in ("accuracy", "nll", "ece")}})
    return out


#: the rows of the per-seed accuracy table: fine-tuning, the recommended classifier and the ceilings
PER_SEED = ("fine-tune", "dirichlet", "oracle-dirichlet-blocks", "oracle-any-lingp")


def print_tables(rows: list[dict], budgets: list[int]) -> list[dict]:
    """The mean table (variants × budgets) and the per-seed accuracy of :data:`PER_SEED`; returns the summary."""
    table = summary(rows)
    print("| variant | " + " | ".join(f"{k} labels: acc / NLL / ECE" for k in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for variant in dict.fromkeys(r["variant"] for r in table):
        cells = [f"{e['accuracy']:.3f} / {e['nll']:.3f} / {e['ece']:.3f}" for e in table if e["variant"] == variant]
        print(f"| {variant} | " + " | ".join(cells) + " |")
    print("\nAccuracy per seed (mean over its draws): " + ", ".join(PER_SEED))
    print("| seed | " + " | ".join(f"{k} labels" for k in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for seed in sorted({r["seed"] for r in rows}):
        cells = [" / ".join(f"{np.mean(accuracy):.3f}" for accuracy in (
            [r["accuracy"] for r in rows if (r["seed"], r["labels_per_class"], r["variant"]) == (seed, k, variant)]
            for variant in PER_SEED) if accuracy) for k in budgets]
        print(f"| {seed} | " + " | ".join(cells) + " |")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budgets", type=int, nargs="+", default=[1, 2, 5, 10])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="seed 0, 1 label per class, 1 draw (a smoke run)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "study_few_labels"))
    parser.add_argument("--tables", metavar="JSON", help="print the tables of a saved run instead of running")
    args = parser.parse_args()
    if args.tables:
        saved = json.loads(Path(args.tables).read_text())
        print_tables(saved["rows"], saved["budgets"])
        return
    if args.quick:
        args.seeds, args.budgets, args.repeats = [0], [1], 1
    torch.set_num_threads(1)
    started = time.perf_counter()
    rows = [r for seed in args.seeds for r in run_seed(seed, args.budgets, args.repeats)]
    table = print_tables(rows, args.budgets)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "study_few_labels_quick.json" if args.quick else "study_few_labels.json"
    (out / name).write_text(json.dumps({"seeds": args.seeds, "budgets": args.budgets, "repeats": args.repeats,
                                        "command": " ".join(sys.argv), "summary": table, "rows": rows,
                                        "seconds": time.perf_counter() - started}, indent=1))
    print(f"wrote {out / name}; {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
