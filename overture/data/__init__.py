"""Corpus sources, tokenizer training, and cached example preparation."""
