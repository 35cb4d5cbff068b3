"""Compute and generation: graph builder, executor and engine, KV cache, sampler, generation loop, chat."""
