"""lowbit's built-in passes, one module each (registered by name through the ``lowbit.passes``
entry points in ``pyproject.toml``). The mixed-precision planner uses the analysis layer and
lives there: ``lowbit.compiler.analysis.plan_mixed``."""

from lowbit.passes.calibrate import CalibratePass
from lowbit.passes.canonicalize import CanonicalizePass
from lowbit.passes.fold_norms import FoldNormScalesPass
from lowbit.passes.fuse_linears import FuseSharedInputLinearsPass
from lowbit.passes.plan import PlanUniformPass
from lowbit.passes.quantize_embeddings import QuantizeEmbeddingsPass
from lowbit.passes.quantize_weights import QuantizeWeightsPass
from lowbit.passes.recognize import RecognizeStructuresPass
from lowbit.passes.rotate import RotateResidualStreamPass
from lowbit.passes.smooth import SmoothActivationsPass

__all__ = [
    "CalibratePass",
    "CanonicalizePass",
    "FoldNormScalesPass",
    "PlanUniformPass",
    "FuseSharedInputLinearsPass",
    "QuantizeEmbeddingsPass",
    "QuantizeWeightsPass",
    "RecognizeStructuresPass",
    "RotateResidualStreamPass",
    "SmoothActivationsPass",
]
