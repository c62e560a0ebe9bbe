"""Training stack of the default model: encoders, losses, stages, the `train` CLI and `export_default`."""
