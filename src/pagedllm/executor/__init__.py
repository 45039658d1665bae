"""Executors drive the workers; one interface for a single process or many."""
