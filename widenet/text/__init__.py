"""Text side of widenet: word-piece tokenizers for ALBERT-style pretraining."""
