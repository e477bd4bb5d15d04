"""Fine-tuning of pretrained checkpoints (GLUE-style classification, text-conditioned GANs)."""
