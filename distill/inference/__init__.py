"""One inference layer for probe, evaluate, annotate, index and the service.

sequences.py (validation, long-sequence policy) -> layer.py (token-budget batches, input order, one result type)
over thin backends (onnx_backend.py, torch_backend.py, http_backend.py); resolve.py turns any model spec into
an ``Inference``. Importing this package (and the ONNX backend) does not import torch.
"""

from distill.core.config import INFERENCE_MAX_TOKENS
from distill.inference.layer import Embedding, Inference, heads_asked, stack, top_k
from distill.inference.resolve import resolve
from distill.inference.sequences import LONG_POLICIES, SequenceError, validate

__all__ = [
    "INFERENCE_MAX_TOKENS",
    "LONG_POLICIES",
    "Embedding",
    "Inference",
    "SequenceError",
    "heads_asked",
    "resolve",
    "stack",
    "top_k",
    "validate",
]
