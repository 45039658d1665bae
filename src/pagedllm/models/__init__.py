"""Model families, looked up by the `architectures` entry of their config."""
