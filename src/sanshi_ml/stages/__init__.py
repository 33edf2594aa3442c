"""The pipeline's stages: what the CLI commands, the DVC stages and the notebooks call."""
