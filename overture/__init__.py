"""overture: text-and-image pretraining on Hugging Face Accelerate."""

__version__ = "0.1.0"
