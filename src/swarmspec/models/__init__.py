"""Models: the registry of packaged weights and loading them for inference."""
