"""The bottom layer: text -> tokens, configs, labels, the model class and how it is saved and loaded (bundles, fair-esm and
Hugging Face checkpoints), losses and calibration. Imports nothing above it."""
