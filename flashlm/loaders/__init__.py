"""Model readers (GGUF), weight placement, tokenizer, and assembling a loaded model."""
