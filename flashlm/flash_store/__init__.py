"""The flash store: its layout (row-column bundled FFN records), writer, validating reader, I/O engine, the memory
budget planner, neuron residency (hot prefix, sliding window), the output-head sketch and the sparsity predictor.
Runs no model: what needs one (calibration, conversion) lives in tools/."""
