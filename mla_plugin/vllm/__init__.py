"""Everything that imports vLLM: registration, backends, version shims."""
