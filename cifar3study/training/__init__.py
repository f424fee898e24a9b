"""Models, the seed-group trainer, and what a train stage writes (checkpoint, history, run info)."""
