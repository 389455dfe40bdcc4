"""Directional signals: a TCN (causal dilated convolutions) trained on the triple-barrier labels."""
