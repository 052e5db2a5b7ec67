"""Sample quality and likelihood metrics.

    frechet_distance(mu1, cov1, mu2, cov2)        FD in float64 (frechet.py)
    feature_extractor("fmnist" | "digits" | "shapes" | "inception", weights=None)
                                                  pluggable features (features.py, classifiers.py,
                                                  inception.py); reference_stats() caches them
    precision_recall(real, fake, k=3)             Kynkaanniemi et al. 2019 (precision_recall.py)
    inception_score(probs)                        IS, here with difflab's domain classifiers
    attribute_accuracy(net, images, attributes)   shapes: shape/color/size/position/background
    vlb_bits_per_dim / ode_bits_per_dim           NLL in bits/dim: DDPM bound, probability-flow ODE
    evaluate_run(run, ...)                        everything `difflab eval` reports (evaluate.py)

The classifiers' weights and cards are in checkpoints/classifiers/; their recipe is
`python -m difflab.metrics.train_classifiers NAME`.
"""

from difflab.metrics.bpd import discrete_log_prob, ode_bits_per_dim, quantize, vlb_bits_per_dim
from difflab.metrics.classifiers import (
    CLASSIFIERS,
    FeatureNet,
    FeatureNetConfig,
    attribute_accuracy,
    load_classifier,
)
from difflab.metrics.evaluate import evaluate_run, format_report, score_samples
from difflab.metrics.features import (
    EXTRACTORS,
    FeatureExtractor,
    ReferenceStats,
    default_extractor,
    extract,
    feature_extractor,
    reference_stats,
    stats_cache_dir,
)
from difflab.metrics.frechet import GaussianStats, frechet_distance, mean_cov
from difflab.metrics.inception import InceptionV3, load_inception
from difflab.metrics.inception_score import inception_score
from difflab.metrics.precision_recall import knn_radii, precision_recall

__all__ = [name for name in dir() if not name.startswith("_")]
