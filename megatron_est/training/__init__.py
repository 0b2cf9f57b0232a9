"""Training loop, optimizer and schedule, metrics and evaluation."""
