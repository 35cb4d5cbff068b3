"""flashlm's protobuf writer produces the same ONNX messages as the onnx package's own helpers."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from flashlm.quant import onnx_proto as proto


def test_model_parses_checks_and_equals_onnx_helper():
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    ours = onnx.load_from_string(proto.model(
        "g",
        [proto.node("MatMul", ["x", "w"], ["y"]),
         proto.node("Gelu", ["y"], ["z"], domain="com.microsoft"),
         proto.node("Split", ["z", "s"], ["a", "b"], axis=-1),
         proto.node("LayerNormalization", ["a", "g"], ["c"], epsilon=1e-5, axis=-1)],
        [proto.value_info("x", np.float32, [1, "S", 3])],
        [proto.value_info("c", np.float32, [1, "S", 2]), proto.value_info("b", np.float32, [1, "S", 2])],
        [proto.tensor("w", w), proto.tensor("s", np.array([2, 2], np.int64)),
         proto.tensor("g", np.ones(2, np.float32))],
        {"": 21, "com.microsoft": 1}, 10))
    ref = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]),
         helper.make_node("Gelu", ["y"], ["z"], domain="com.microsoft"),
         helper.make_node("Split", ["z", "s"], ["a", "b"], axis=-1),
         helper.make_node("LayerNormalization", ["a", "g"], ["c"], epsilon=1e-5, axis=-1)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", 3])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, "S", 2]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, "S", 2])],
        [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(np.array([2, 2], np.int64), "s"),
         onnx.numpy_helper.from_array(np.ones(2, np.float32), "g")]),
        ir_version=10, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    ref.producer_name = "flashlm"
    onnx.checker.check_model(ours)
    assert ours.graph == ref.graph
    assert ours.ir_version == ref.ir_version
    assert list(ours.opset_import) == list(ref.opset_import)


def test_external_tensor_and_negative_ints():
    t = onnx.TensorProto()
    t.ParseFromString(proto.external_tensor("w", np.uint8, (4, 8), 32))
    assert t.data_location == TensorProto.EXTERNAL and list(t.dims) == [4, 8] and t.data_type == TensorProto.UINT8
    assert {e.key: e.value for e in t.external_data}["length"] == "32"
    n = onnx.NodeProto()
    n.ParseFromString(proto.node("Squeeze", ["x"], ["y"], axes=[-1, 0], axis=-3))
    attrs = {a.name: a for a in n.attribute}
    assert list(attrs["axes"].ints) == [-1, 0] and attrs["axis"].i == -3
