"""Experiments built on the trainer's own runs: the optimizer benchmark (trainer/lab/benchmark/)."""
