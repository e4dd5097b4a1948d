"""Segment 1A states S0..S9 (one module per state)."""
