"""Flax's own BatchNorm tests, run with gbn_jax's layer in its place."""
