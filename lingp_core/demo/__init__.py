"""lingp's transfer demo: few-shot adaptation of a small CNN from upright to rotated, noisy scikit-learn digits.

Run it with ``python -m lingp_core.demo`` (``--help`` for options). It needs the ``demo`` extra (torch,
scikit-learn, matplotlib, tqdm); ``import lingp_core`` never imports this package.

Modules: :mod:`~lingp_core.demo.data` (domains and few-shot draws), :mod:`~lingp_core.demo.network` (the CNN and
its training), :mod:`~lingp_core.demo.baselines` (source network, last-layer retraining, fine-tuning),
:mod:`~lingp_core.demo.transfer` (the lingp rows; GP scores become class probabilities by
:func:`lingp_core.probability_of_largest`), :mod:`~lingp_core.demo.metrics` (accuracy, NLL, ECE, reliability bins),
:mod:`~lingp_core.demo.experiment` (the run), :mod:`~lingp_core.demo.plots`.
"""
