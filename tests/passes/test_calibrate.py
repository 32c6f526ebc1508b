"""CalibratePass: statistics of every linear input into the compile context, and its record."""

import numpy as np
import pytest

from lowbit.compiler.core.errors import PassFailedError
from lowbit.compiler.core.passbase import CompileContext
from lowbit.compiler.core.pipeline import run_pipeline
from lowbit.passes.calibrate import CalibratePass, CalibrateRecord
from tests.graphs import mlp

BATCHES = [{"x": np.random.default_rng(i).standard_normal((1, 4, 8)).astype(np.float32)} for i in range(3)]


def test_statistics_of_linear_inputs_and_the_record():
    context = CompileContext(calibration_batches=BATCHES, progress=False)
    model = mlp()
    run_pipeline(model, [CalibratePass(max_batches=2)], context=context)
    assert set(context.stats) == {"xn", "hr"}  # up and side share xn; down reads hr
    record = context.results.latest(CalibrateRecord)
    assert record.to_json() == {"batches": 2, "tensors": 2, "tokens": 2 * 4 * 8}  # elements of the first input


def test_requires_calibration_batches():
    with pytest.raises(PassFailedError, match=r"^pass CalibratePass failed \(after nothing\): calibrate needs "
                                              r"calibration data, and the compile context has none"):
        run_pipeline(mlp(), [CalibratePass()], context=CompileContext())
