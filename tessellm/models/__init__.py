"""Model definitions and the HF-architecture registry."""
