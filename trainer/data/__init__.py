"""Data: local corpora and Hugging Face datasets -> tokenizers -> sharded token files -> batches."""
