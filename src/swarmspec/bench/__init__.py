"""`swarmspec bench`: every decoding method against the `transformers` peers, Spec-Bench style."""
