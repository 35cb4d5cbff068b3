"""flashlm's own GGUF metadata keys, for what GGUF has no key for."""

# The FFN gate's activation of a llama-family model: "silu" (absent: SwiGLU) or "relu" (ReLU-fied models: ProSparse,
# TurboSparse, flashlm sparsify). llama.cpp would run such a file as SiLU.
KEY_FFN_ACTIVATION = "flashlm.ffn_activation"
FFN_ACTIVATIONS = ("silu", "relu")
