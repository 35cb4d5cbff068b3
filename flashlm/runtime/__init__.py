"""Compute and generation: building an engine from a file (model_loader: GGUF; flash_loader: .flash on CPU or
CUDA), the executors, FFN streaming, KV cache, sampler, the generation loop and chat formatting."""
