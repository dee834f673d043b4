"""opq_torch: the thin PyTorch adapter of opq."""
