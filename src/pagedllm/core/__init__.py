"""The engine core's decisions: block pool, KV cache manager and scheduler (no models, no devices)."""
