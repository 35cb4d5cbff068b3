"""Quantized block formats (one codec each) and the matrix kernels chosen by format."""
