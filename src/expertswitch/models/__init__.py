"""Decoder models served from one base and many packed expert deltas."""
