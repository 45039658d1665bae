"""Paged attention: the batch metadata and the backends that read/write the paged KV cache."""
