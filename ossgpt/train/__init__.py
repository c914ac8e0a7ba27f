"""Training: one loop (trainer.py) for every method."""
