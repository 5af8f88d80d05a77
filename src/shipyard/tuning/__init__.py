"""Model selection above training: k-fold cross-validation and hyperparameter search.

Example::

    from shipyard.config import load_config
    from shipyard.tuning import cross_validate, tune
    cv = cross_validate(load_config("examples/digits-mlp.yaml"), folds=5)
    print(cv.mean["accuracy"], cv.std["accuracy"])
    best = tune("examples/digits-tune.yaml", trials=8)   # needs pip install 'shipyard[tune]'
    print(best.best_value, best.best_config)
"""

from __future__ import annotations

from shipyard.tuning.cv import CVResult, FoldResult, cross_validate, fold_config, summarize
from shipyard.tuning.space import apply_values, check_search_space
from shipyard.tuning.tune import TuneResult, tune

__all__ = [
    "CVResult",
    "FoldResult",
    "TuneResult",
    "apply_values",
    "check_search_space",
    "cross_validate",
    "fold_config",
    "summarize",
    "tune",
]
