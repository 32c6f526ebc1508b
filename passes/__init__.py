"""lowbit's built-in passes, one module each; importing registers them."""

from lowbit.passes.calibrate import CalibratePass
from lowbit.passes.canonicalize import CanonicalizePass
from lowbit.passes.plan import PlanUniformPass
from lowbit.passes.quantize_embeddings import QuantizeEmbeddingsPass
from lowbit.passes.quantize_weights import QuantizeWeightsPass
from lowbit.passes.recognize import RecognizeStructuresPass

__all__ = [
    "CalibratePass",
    "CanonicalizePass",
    "PlanUniformPass",
    "QuantizeEmbeddingsPass",
    "QuantizeWeightsPass",
    "RecognizeStructuresPass",
]
