import numpy as np
import pytest

from lowbit.compiler.core.calibration import TensorObserver, check_inputs, observe
from lowbit.compiler.core.errors import CalibrationError


def test_observer_statistics_stream_with_bounded_memory():
    rng = np.random.default_rng(0)
    obs = TensorObserver("t")
    data = []
    for _ in range(5):
        x = rng.standard_normal((2, 7, 4)).astype(np.float32)
        x[..., 2] *= 20
        obs.update(x)
        data.append(x.reshape(-1, 4))
    all_x = np.concatenate(data)
    np.testing.assert_allclose(obs.absmax, np.abs(all_x).max(axis=0))
    assert obs.min == all_x.min() and obs.max == all_x.max() and obs.count == all_x.size
    lo, hi = obs.percentile_range(100.0)
    assert hi == pytest.approx(all_x.max(), rel=0.02) and lo == pytest.approx(all_x.min(), rel=0.02)
    assert obs.outlier_ratio() > 5
    assert obs.pos_hist.size == obs.neg_hist.size == 2048  # fixed, whatever the token count


def test_row_skew():
    sym, one_sided = TensorObserver("a"), TensorObserver("b")
    sym.update(np.array([[-1.0, 1.0, 0.5], [-2.0, 0.0, 2.0]], np.float32))
    one_sided.update(np.array([[0.0, 3.0, 1.0], [1.0, 2.0, 0.5]], np.float32))
    assert sym.row_skew() == 0.0
    assert one_sided.row_skew() == 1.0


def test_shared_zero_point_follows_row_skew():
    rng = np.random.default_rng(1)
    sym, pos = TensorObserver("a"), TensorObserver("b")
    x = rng.standard_normal((64, 16)).astype(np.float32)
    sym.update(x)
    x[:, 0] = 20 + rng.standard_normal(64)  # a fixed-sign outlier channel: rows reach far above 0
    pos.update(x)
    assert 120 <= sym.shared_zero_point() <= 136
    assert pos.shared_zero_point() < 40
    assert TensorObserver("empty").shared_zero_point() is None


def test_nan_is_named():
    import onnx_ir as ir
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Log", ["x"], ["logx"]), helper.make_node("Relu", ["logx"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10))
    batches = [{"x": np.array([1.0, 2.0], np.float32)}, {"x": np.array([-1.0, 2.0], np.float32)}]  # log(-1) = NaN
    with pytest.raises(CalibrationError, match=r"tensor 'logx' has NaN or infinite values on calibration data \(batch 1\)"):
        observe(model, ["logx"], batches, show_progress=False)
    with pytest.raises(CalibrationError, match="input 'x' contains NaN"):
        check_inputs([{"x": np.array([np.nan], np.float32)}])
    with pytest.raises(CalibrationError, match="no calibration data"):
        check_inputs([])


def test_tensor_scale_bits_measures_the_cost_of_one_range_per_run():
    same = TensorObserver("same")
    same.update(np.array([[[-1.0, 2.0], [2.0, -1.0]]], np.float32))  # every row spans [-1, 2]
    assert same.tensor_scale_bits() == 0.0
    mixed = TensorObserver("mixed")
    mixed.update(np.array([[[-1.0, 1.0], [-4.0, 4.0]]], np.float32))  # one run: ranges 2 and 8, run range 8
    mixed.update(np.array([[[0.0, 1.0], [0.0, 1.0]]], np.float32))  # another run: no loss
    # rows' (run range / row range)^2: 16, 1, 1, 1 -> 0.5 * log2(19 / 4)
    assert mixed.tensor_scale_bits() == pytest.approx(0.5 * np.log2(19 / 4))
    assert TensorObserver("empty").tensor_scale_bits() is None
    assert mixed.summary()["tensor_scale_bits"] == pytest.approx(0.5 * np.log2(19 / 4), abs=1e-3)
