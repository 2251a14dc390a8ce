"""posttrain: post-training for causal language models, readable and offline-first."""

__version__ = "0.1.0"
