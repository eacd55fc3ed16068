"""LTAU-FF (methods.md section 4): per-atom training-error distributions, latent nearest neighbours, calibration."""

from atomuq.uq.ltau.calibration import brier_score, fit_scale, reliability_curve
from atomuq.uq.ltau.distribution import HistogramBins, run_confidences, sample_confidence
from atomuq.uq.ltau.estimator import LTAUEstimator, fit_estimator
from atomuq.uq.ltau.index import NeighbourIndex, build_index

__all__ = [
    "HistogramBins", "LTAUEstimator", "NeighbourIndex", "brier_score", "build_index", "fit_estimator", "fit_scale",
    "reliability_curve", "run_confidences", "sample_confidence",
]
