"""flashlm's own GGUF metadata keys, for what GGUF has no key for."""

# The FFN activation of a llama-family model: "silu" (absent: SwiGLU, silu(gate) * up), "relu" (ReLU-fied models:
# ProSparse, flashlm sparsify; relu(gate) * up) or "drelu" (TurboSparse's dReLU: relu(gate) * relu(up), a neuron is
# zero when either is). llama.cpp would run such a file as SiLU.
KEY_FFN_ACTIVATION = "flashlm.ffn_activation"
FFN_ACTIVATIONS = ("silu", "relu", "drelu")
