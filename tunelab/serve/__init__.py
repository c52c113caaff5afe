"""OpenAI-compatible HTTP server over the engine's async API (``tunelab serve``)."""
