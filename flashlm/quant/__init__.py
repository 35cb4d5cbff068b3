"""Quantized block formats (one codec each), the kernels chosen by format (C bundle kernels, CUDA kernels,
onnxruntime's MatMulNBits through the ONNX graph builder), and the placement of a file's tensors into them."""
