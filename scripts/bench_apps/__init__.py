"""Apps served by scripts/bench."""
