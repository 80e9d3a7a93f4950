"""Evaluation: per-domain held-out perplexity and task scores."""
