"""The BentoML service (service.py) and the model-store helpers behind `distill import` / `distill serve` (store.py)."""
