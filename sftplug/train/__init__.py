"""A training run: building it, one update, the loop, and the loss, schedule and precision it uses."""
