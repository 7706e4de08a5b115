"""fastsmooth: fast, sound randomized-smoothing certification for image classifiers.

    import fastsmooth
    smooth = fastsmooth.Smooth(model, num_classes=10, noise=fastsmooth.Gaussian(sigma=0.25))
    cert = smooth.certify(x, n0=100, n=100_000, alpha=0.001)   # cert.prediction, cert.radius
"""

from .noises import ExpInf, Gaussian, Laplace, Noise, Uniform, make_noise
from .sampler import NonFiniteLogitsError
from .smooth import Certificate, Prediction, Smooth
from .stats import clopper_pearson_lower, clopper_pearson_upper, predict_from_counts, predict_pvalue

__version__ = "0.1.0"

__all__ = [
    "Certificate", "ExpInf", "Gaussian", "Laplace", "Noise", "NonFiniteLogitsError", "Prediction",
    "Smooth", "Uniform", "clopper_pearson_lower", "clopper_pearson_upper", "make_noise",
    "predict_from_counts", "predict_pvalue",
]
