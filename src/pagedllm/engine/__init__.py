"""The engine: the step loop (engine core) and its front ends (sync LLMEngine, async for the server)."""
