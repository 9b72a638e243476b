"""One-line summaries shown by `bilevel list` (plain text, at most 74 characters, so a
listed line fits 100 columns). Add a line here for every new problem or solver; the
command says so when one is missing, and tests/test_cli_units.py checks coverage."""

PROBLEMS: dict[str, str] = {
    "distillation": "learn a few synthetic digit images that train a good classifier",
    "hyper_representation": "meta-learn an RNN encoder shared by small digit tasks",
    "hypercleaning": "per-sample weights that down-weight corrupted labels (digits)",
    "imaml": "meta-learn an initialisation that adapts fast to few-shot tasks (iMAML)",
    "logreg_hpo": "one L2 weight per feature, logistic regression (breast cancer)",
    "multiblock_hpo": "per-class L2 weights of a one-vs-rest logistic regression",
    "multiblock_quadratic": "quadratic lower problems sharing x, closed-form optimum",
    "quadratic": "quadratic upper and lower objectives with a closed-form optimum",
    "ridge_hpo": "one L2 weight per feature of a ridge regression (diabetes data)",
    "svm_hpo": "per-sample weights of a linear SVM with margin constraints",
}

SOLVERS: dict[str, str] = {
    "borep": "normalised momentum for upper objectives of unbounded smoothness",
    "bsvrb": "variance-reduced stochastic method for multi-block problems",
    "f2sa": "fully first-order stochastic penalty method (no second derivatives)",
    "implicitdiff": "inner gradient steps, then the implicit-function hypergradient",
    "lvhba": "Hessian-free method for lower problems with constraints",
    "masoba": "SOBA with moving averages of the stochastic gradients",
    "penalty": "value-function penalty method, double or single loop",
    "saba": "SOBA with SAGA variance reduction (finite sums)",
    "slbamm": "single-loop multiplier method for merely convex lower problems",
    "soba": "single-loop stochastic method: y, x and the adjoint updated together",
    "srba": "SOBA with SARAH variance reduction (finite sums)",
    "unrolled": "differentiates through the unrolled inner gradient steps",
    "vpbgd": "gradient descent on the value-function penalised objective",
}
