"""The user-facing tools behind the CLI commands: convert, calibrate, info, perplexity, bench, bench-budget, chat.
They use the public API (flashlm.model) and the layers below it; lab scripts live in labs/, outside the package."""
