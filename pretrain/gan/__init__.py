"""Text-to-image GAN families: GAN-INT-CLS and a DF-GAN-style model, conditioned on a frozen text encoder."""
