"""Text pretraining objectives: masked LM (80/10/10), next-sentence prediction."""
