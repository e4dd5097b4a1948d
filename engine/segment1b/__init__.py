"""Segment 1B states S0..S9 (one module per state)."""
