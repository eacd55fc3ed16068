"""Evaluating a UQ method against true errors (methods.md section 9).

- ranking: spearman, roc_auc (does the score rank / flag errors?)
- bootstrap: bootstrap_ci (percentile CI of any of these numbers, resampling structures)
- calibration: rmse_vs_rmv, ence, zms, calibration_curve, miscalibration_area (is σ calibrated?)
- isotonic: IsotonicMap (monotone map from a raw score to the expected error)
- conformal: ConformalCalibrator (error bars with a stated coverage), Coverage
- combined: MaxScore (the larger of several scores, each scaled to the error: a normaliser for bounds under shift)
- plots: figures of all of the above (imported separately: `from atomuq.uq.evaluate import plots`)

Argument order everywhere: (score or sigma, error, ...); every function checks its input and raises
InputError instead of returning NaN.
"""

from .bootstrap import BootstrapCI, bootstrap_ci
from .calibration import (
    BinnedCalibration,
    calibration_curve,
    ence,
    miscalibration_area,
    rmse_vs_rmv,
    zms,
)
from .combined import MaxScore
from .conformal import ConformalCalibrator, Coverage, min_calibration_size
from .isotonic import IsotonicMap
from .ranking import RocAuc, roc_auc, spearman

__all__ = [
    "BinnedCalibration",
    "BootstrapCI",
    "ConformalCalibrator",
    "Coverage",
    "IsotonicMap",
    "MaxScore",
    "RocAuc",
    "bootstrap_ci",
    "calibration_curve",
    "ence",
    "miscalibration_area",
    "min_calibration_size",
    "rmse_vs_rmv",
    "roc_auc",
    "spearman",
    "zms",
]
