"""Entry points: the one-line command-line checks and one training run from a composed config."""
