"""Checkpoint converters (no vLLM import)."""
