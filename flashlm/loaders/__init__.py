"""Files in: the validating GGUF reader, Hugging Face directories (read, and converted once to GGUF), the tokenizer,
the default model's location, and flashlm's own metadata keys. Imports nothing of flashlm but the base modules."""
