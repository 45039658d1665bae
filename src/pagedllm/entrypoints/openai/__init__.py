"""The OpenAI-compatible server (`pagedllm serve`)."""
