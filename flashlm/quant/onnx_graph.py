"""Building onnxruntime sessions whose large weights never pass through protobuf.

Weights are declared as external initializers and handed to onnxruntime as OrtValues over our numpy buffers
(`SessionOptions.add_external_initializers`): no serialization copy, the 2 GB protobuf limit does not apply, and
MatMulNBits still sees them as constants and prepacks them (a weight fed as a graph input instead runs ~60x slower). onnxruntime keeps its own (packed) copy, so our buffers can be dropped once the session exists.
"""

from __future__ import annotations

import itertools

import numpy as np

from flashlm.quant import onnx_proto as proto

OPSET = 21
MS_DOMAIN = "com.microsoft"
IR_VERSION = 10  # this onnxruntime refuses newer IR versions for hand-built models
_INLINE_LIMIT = 4096  # bytes; smaller constants go inline in the proto


class GraphBuilder:
    """Accumulates nodes, inputs, outputs and constants; `session()` turns them into an InferenceSession."""

    def __init__(self, name: str):
        self.name = name
        self.nodes: list[bytes] = []
        self.inputs: list[bytes] = []
        self.declared: set[str] = set()  # names of the inputs
        self.outputs: list[bytes] = []
        self.initializers: list[bytes] = []
        self.external: dict[str, np.ndarray] = {}
        self.resident_bytes = 0  # bytes of large constants (weights) handed to onnxruntime
        self._ids = itertools.count()
        self.memo: dict[tuple, str] = {}  # shared sub-results, e.g. per-block sums of one input
        self.taps: dict[tuple[str, int], str] = {}  # (kind, layer) -> intermediate a caller may ask to see

    def fresh(self, hint: str) -> str:
        return f"{hint}_{next(self._ids)}"

    def input(self, name: str, dtype, shape: list) -> str:
        self.inputs.append(proto.value_info(name, dtype, shape))
        self.declared.add(name)
        return name

    def output(self, name: str, dtype, shape: list | None) -> str:
        self.outputs.append(proto.value_info(name, dtype, shape))
        return name

    def const(self, hint: str, array: np.ndarray) -> str:
        name = self.fresh(hint)
        array = np.ascontiguousarray(array)
        if array.nbytes <= _INLINE_LIMIT:
            self.initializers.append(proto.tensor(name, array))
        else:
            self.initializers.append(proto.external_tensor(name, array.dtype, array.shape, array.nbytes))
            self.external[name] = array
            self.resident_bytes += array.nbytes
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", out: list[str] | None = None,
           **attrs) -> str | list[str]:
        outputs = out or [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(proto.node(op_type, inputs, outputs, domain=domain, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def expose_taps(self, kinds: tuple[str, ...]) -> list[str]:
        """Make the recorded intermediates of these kinds graph outputs named `{kind}_{layer}`."""
        names = []
        for (kind, layer), value in self.taps.items():
            if kind in kinds:
                name = f"{kind}_{layer}"
                self.op("Identity", [value], out=[name])
                self.output(name, np.float32, [1, "S", f"{kind}_dim"])
                names.append(name)
        return names

    def model_bytes(self) -> bytes:
        return proto.model(self.name, self.nodes, self.inputs, self.outputs, self.initializers,
                           {"": OPSET, MS_DOMAIN: 1}, IR_VERSION)
    def session(self, threads: int):
        """Create the session, then release our copies of the weights (onnxruntime holds its own)."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # No arena or memory patterns: with one session per layer, each would keep its own high-water mark of
        # activation buffers (~10 MB each after a 128-token prompt); plain malloc/free hands them back.
        opts.enable_cpu_mem_arena = False
        opts.enable_mem_pattern = False
        # Several sessions on few cores fight over threads when idle workers spin.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        names = list(self.external)
        values = [ort.OrtValue.ortvalue_from_numpy(self.external[n]) for n in names]
        if names:
            opts.add_external_initializers(names, values)
        sess = ort.InferenceSession(self.model_bytes(), opts, providers=["CPUExecutionProvider"])
        self.external.clear()
        return sess
