"""Tools around the runtime: benchmarks, default model lookup, evaluation helpers."""
