"""Data: built-in problem spaces and the synthetic pretraining corpus."""
