"""Intra-Fusion: structured pruning that fuses pruned channels into kept ones via optimal transport."""
