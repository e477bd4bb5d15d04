"""overture: text-and-image pretraining on Hugging Face Accelerate."""

__version__ = "0.1.0"


def load(checkpoint, device=None, max_length=None):
    """An encoder for feature extraction: ``overture.load(DIR).encode(texts)``
    (see overture/features.py). Imports torch and transformers on first use."""
    from .features import load as _load

    return _load(checkpoint, device=device, max_length=max_length)
