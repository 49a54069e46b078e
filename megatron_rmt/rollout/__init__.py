"""Rollouts: the typed trainer<->engine contract, the embedded engine over the trainer's own
weights, and (for vLLM) the HTTP client, server launcher and weight sync."""
