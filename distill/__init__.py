"""esm-distill: distil ESM-1b into small, fast protein language models and put them to work."""

__version__ = "0.1.0"
