"""An OpenAI-compatible HTTP server over an `Engine` (`swarmspec serve`)."""
