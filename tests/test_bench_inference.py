"""The NumPy reference equals ONNX Runtime (shipped model, one hand-built graph per op); `bench --inference` reports every figure."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from gateway.bench_inference import BATCHES, MIN_ROUNDS, demo_gateway_config, measure_inference, render
from gateway.demo.run import MODEL_DIR, demo_config, write_config
from gateway.inference import BACKENDS
from gateway.inference.onnxruntime import open_session
from gateway.numpy_ref import SUPPORTED_OPS, NumpyReference, ReferenceUnavailable, load_numpy_reference

DEMO_MODEL = MODEL_DIR / "pump_ae.onnx"
TOLERANCE = 1e-5
rng = np.random.default_rng(7)


def f32(*shape: int) -> np.ndarray:
    """Standard-normal float32 test data."""
    return rng.standard_normal(shape).astype(np.float32)


def graph(
    nodes: list[onnx.NodeProto],
    feeds: dict[str, np.ndarray],
    consts: dict[str, np.ndarray] | None = None,
    *,
    opset: int = 17,
    outputs: tuple[str, ...] = ("y",),
) -> onnx.ModelProto:
    """A checked model of `nodes` with `feeds` as graph inputs and `consts` as initializers."""
    inputs = [
        helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for n, v in feeds.items()
    ]
    inits = [numpy_helper.from_array(v, n) for n, v in (consts or {}).items()]
    outs = [helper.make_empty_tensor_value_info(o) for o in outputs]
    model = helper.make_model(
        helper.make_graph(nodes, "t", inputs, outs, inits), opset_imports=[helper.make_opsetid("", opset)]
    )
    model.ir_version = 8  # opsets up to 18; the ONNX Runtime of every CI Python reads it
    # Shape inference types the outputs and, strict, proves each test graph is valid ONNX.
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def op(op_type: str, inputs: list[str], **attrs: Any) -> onnx.NodeProto:
    return helper.make_node(op_type, inputs, ["y"], **attrs)


def assert_same_as_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in model.graph.output]
    expected = dict(zip(names, session.run(names, feeds), strict=True))
    got = NumpyReference.from_proto(model).evaluate(feeds)
    assert list(got) == names
    for name in names:
        assert got[name].dtype == expected[name].dtype, name
        assert got[name].shape == expected[name].shape, name
        np.testing.assert_allclose(got[name], expected[name], rtol=TOLERANCE, atol=TOLERANCE, err_msg=name)


X = f32(2, 3, 4)
I64 = np.array([7, -7, 6, -6], dtype=np.int64)
# (id, nodes, feeds, initializers, opset): each op the reference implements, in each form an export uses.
CASES: list[tuple[str, list[onnx.NodeProto], dict[str, np.ndarray], dict[str, np.ndarray], int]] = [
    ("MatMul", [op("MatMul", ["x", "w"])], {"x": X}, {"w": f32(4, 5)}, 17),
    ("Gemm-transB", [op("Gemm", ["a", "b", "c"], transB=1, alpha=0.5, beta=2.0)], {"a": f32(3, 4)},
     {"b": f32(5, 4), "c": f32(5)}, 17),
    ("Gemm-transA-no-C", [op("Gemm", ["a", "b"], transA=1)], {"a": f32(4, 3)}, {"b": f32(4, 5)}, 17),
    ("Add", [op("Add", ["x", "w"])], {"x": X}, {"w": f32(4)}, 17),
    ("Sub", [op("Sub", ["w", "x"])], {"x": X}, {"w": f32(3, 1)}, 17),
    ("Mul", [op("Mul", ["x", "x"])], {"x": X}, {}, 17),
    ("Div-by-zero", [op("Div", ["x", "w"])], {"x": X}, {"w": np.array([2.0, 0.0, -0.5, 1e-3], np.float32)}, 17),
    ("Div-int-truncates", [op("Div", ["x", "w"])], {"x": I64}, {"w": np.array([2, 2, -4, 4], np.int64)}, 17),
    ("Pow", [op("Pow", ["x", "e"])], {"x": X}, {"e": np.array(2.0, np.float32)}, 17),
    ("Pow-sqrt", [op("Pow", ["x", "e"])], {"x": np.abs(X)}, {"e": np.array(0.5, np.float32)}, 17),
    ("Sqrt", [op("Sqrt", ["x"])], {"x": np.abs(X)}, {}, 17),
    ("Relu", [op("Relu", ["x"])], {"x": X}, {}, 17),
    ("Sigmoid-extremes", [op("Sigmoid", ["x"])], {"x": np.array([-1e4, -100, -3, 0, 3, 100, 1e4], np.float32)},
     {}, 17),
    ("Tanh", [op("Tanh", ["x"])], {"x": 3 * X}, {}, 17),
    ("Softmax", [op("Softmax", ["x"], axis=1)], {"x": 10 * X}, {}, 13),
    ("Identity", [op("Identity", ["x"])], {"x": X}, {}, 17),
    ("Reshape-zero-and-minus-one", [op("Reshape", ["x", "s"])], {"x": X}, {"s": np.array([0, -1], np.int64)}, 17),
    ("Flatten", [op("Flatten", ["x"], axis=2)], {"x": X}, {}, 17),
    ("Flatten-negative-axis", [op("Flatten", ["x"], axis=-1)], {"x": X}, {}, 17),
    ("Transpose", [op("Transpose", ["x"], perm=[2, 0, 1])], {"x": X}, {}, 17),
    ("Transpose-default", [op("Transpose", ["x"])], {"x": X}, {}, 17),
    ("ReduceMean-attr", [op("ReduceMean", ["x"], axes=[1], keepdims=0)], {"x": X}, {}, 17),
    ("ReduceMean-all", [op("ReduceMean", ["x"])], {"x": X}, {}, 17),
    ("ReduceMean-input", [op("ReduceMean", ["x", "a"], keepdims=1)], {"x": X}, {"a": np.array([-1], np.int64)},
     18),
    ("Squeeze-attr", [op("Squeeze", ["x"], axes=[0])], {"x": f32(1, 3, 1)}, {}, 11),
    ("Squeeze-all", [op("Squeeze", ["x"])], {"x": f32(1, 3, 1)}, {}, 17),
    ("Squeeze-input", [op("Squeeze", ["x", "a"])], {"x": f32(1, 3, 1)}, {"a": np.array([-1], np.int64)}, 17),
    ("Unsqueeze-attr", [op("Unsqueeze", ["x"], axes=[0, 3])], {"x": f32(2, 3)}, {}, 11),
    ("Unsqueeze-input", [op("Unsqueeze", ["x", "a"])], {"x": f32(2, 3)}, {"a": np.array([-1, 1], np.int64)}, 17),
    ("Concat", [op("Concat", ["x", "w"], axis=1)], {"x": X}, {"w": f32(2, 1, 4)}, 17),
    ("Shape", [op("Shape", ["x"], start=1)], {"x": X}, {}, 17),
    ("Gather-negative", [op("Gather", ["x", "i"], axis=1)], {"x": X}, {"i": np.array([[0, -1]], np.int64)}, 17),
    ("Constant-tensor", [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(f32(4))),
                         op("Add", ["x", "c"])], {"x": X}, {}, 17),
    ("Constant-ints", [helper.make_node("Constant", [], ["s"], value_ints=[6, 4]), op("Reshape", ["x", "s"])],
     {"x": X}, {}, 17),
    ("Constant-float", [helper.make_node("Constant", [], ["c"], value_float=0.25), op("Mul", ["x", "c"])],
     {"x": X}, {}, 17),
]  # fmt: skip


@pytest.mark.parametrize(("nodes", "feeds", "consts", "opset"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_op_equals_onnxruntime(
    nodes: list[onnx.NodeProto], feeds: dict[str, np.ndarray], consts: dict[str, np.ndarray], opset: int
) -> None:
    assert_same_as_ort(graph(nodes, feeds, consts, opset=opset), feeds)


def test_every_supported_op_has_a_case() -> None:
    covered = {n.op_type for _, nodes, _, _, _ in CASES for n in nodes}
    assert covered == SUPPORTED_OPS


def test_shipped_demo_model_equals_onnxruntime() -> None:
    ref = load_numpy_reference(DEMO_MODEL)
    session = open_session(DEMO_MODEL)
    assert ref.inputs == ["window"] and ref.outputs == ["score", "channel_error"]
    for batch in (1, 8, 64):
        window = f32(batch, 32, 8)
        expected = session.run(ref.outputs, {"window": window})
        got = ref.evaluate({"window": window})
        for name, want in zip(ref.outputs, expected, strict=True):
            assert got[name].shape == want.shape
            np.testing.assert_allclose(got[name], want, rtol=TOLERANCE, atol=TOLERANCE, err_msg=name)


def test_a_chain_of_ops_equals_onnxruntime() -> None:
    """Shape arithmetic feeding a Reshape, as an nn.Unflatten export does; two outputs."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "zero1"], ["b1"]),
        helper.make_node("Concat", ["b1", "rest"], ["target"], axis=0),
        helper.make_node("Flatten", ["x"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["h"]),
        helper.make_node("Tanh", ["h"], ["t"]),
        helper.make_node("Reshape", ["t", "target"], ["y"]),
        helper.make_node("ReduceMean", ["y"], ["m"], axes=[2], keepdims=0),
    ]
    consts = {
        "zero": np.array(0, np.int64),
        "zero1": np.array([0], np.int64),
        "rest": np.array([3, 4], np.int64),
        "w": f32(12, 12),
    }
    feeds = {"x": X}
    assert_same_as_ort(graph(nodes, feeds, consts, outputs=("y", "m")), feeds)


def test_unsupported_ops_are_refused_by_name() -> None:
    conv = op("Conv", ["x", "w"])
    model = graph([conv], {"x": f32(1, 2, 8)}, {"w": f32(3, 2, 3)})
    with pytest.raises(ReferenceUnavailable, match="no Conv") as info:
        NumpyReference.from_proto(model)
    assert info.value.ops == ("Conv",)
    old_softmax = graph([op("Softmax", ["x"])], {"x": X}, opset=11)  # flattens to 2-D before opset 13
    with pytest.raises(ReferenceUnavailable, match="no Softmax"):
        NumpyReference.from_proto(old_softmax)


def test_without_onnx_the_reference_is_skipped_and_the_bench_still_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # what `import onnx` meets where it is not installed
    with pytest.raises(ReferenceUnavailable, match="pip install onnx") as info:
        load_numpy_reference(DEMO_MODEL)
    assert info.value.ops == ()
    result = asyncio.run(measure_inference(demo_gateway_config(), per_batch_s=0.01))
    (model,) = result["models"]
    assert model["numpy_reference"] == "skipped (needs onnx: pip install onnx)"
    assert model["dense"] is None and model["numpy_max_abs_diff"] is None
    assert "numpy" not in {row["path"] for row in model["rows"]}
    assert {row["batching_target"] for row in model["rows"] if row["path"] == "stage"} == {"n/a"}
    assert "pump_ae: NumPy reference: skipped (needs onnx: pip install onnx)" in render(result)


def test_bench_inference_json_reports_every_field(tmp_path: Path) -> None:
    cfg = write_config(
        demo_config(opc_port=4840, mqtt_port=1883, db_path=tmp_path / "unused.db"), tmp_path / "site.yaml"
    )
    cmd = [sys.executable, "-m", "gateway", "bench", "--inference", "--config", str(cfg), "--per-batch-s", "0.05"]
    proc = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert isinstance(r["machine"], str) and r["onnxruntime"] == ort.__version__ and r["numpy"] == np.__version__
    assert r["batches"] == list(BATCHES) and r["per_batch_s"] == 0.05
    assert isinstance(r["block_calls"], int) and isinstance(r["warmup_rounds"], int)
    assert r["targets"] == {"stage_over_bare": 1.3, "batch64_over_batch1": 0.2}
    (m,) = r["models"]
    assert m["model"] == "pump_ae" and m["dense"] is True and m["numpy_reference"] == "ok"
    assert 0 <= m["numpy_max_abs_diff"] <= TOLERANCE
    assert all(m["rounds"][str(b)] >= MIN_ROUNDS for b in BATCHES)
    stages = [row for row in m["rows"] if row["path"] == "stage"]
    assert [row["path"] for row in m["rows"]] == ["bare", *["stage"] * len(stages), "numpy"]
    # Every backend is either measured or skipped with its reason.
    assert {row["backend"] for row in stages} | set(m["skipped_backends"]) == set(BACKENDS)
    assert all(isinstance(why, str) and why for why in m["skipped_backends"].values())
    for row in m["rows"]:
        us = row["us_per_window"]
        assert set(us) == {str(b) for b in BATCHES} and all(isinstance(v, float) and v > 0 for v in us.values())
        assert row["batching_speedup"] == pytest.approx(us["1"] / us["64"], rel=0.01)
    for row in stages:
        assert set(row["stage_over_bare"]) == {str(b) for b in BATCHES}
        assert row["batching_target"] in ("PASS", "FAIL")
        assert row["stage_target"] in (("PASS", "FAIL") if row["backend"] == "onnxruntime-cpu" else ("n/a",))
    table = render(r)
    assert "stage onnxruntime-cpu" in table and "numpy reference" in table
    assert "NumPy reference = ONNX Runtime within" in table
