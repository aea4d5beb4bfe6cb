"""Data: text classification, causal-LM blocks, images, and the offline asset cache."""
