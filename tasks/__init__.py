"""Task definitions for fine-tuning and evaluation (GLUE, custom CSV / JSONL tasks)."""
