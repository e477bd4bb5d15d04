"""Pretraining families (one module each), found by name through overture.registry."""
