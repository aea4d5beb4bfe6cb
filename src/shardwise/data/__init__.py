"""Data: text classification, causal-LM blocks, chat conversations, images, and the offline asset cache."""
