"""The OpenAI-compatible HTTP server: protocol models, the FastAPI app, and its routes."""
