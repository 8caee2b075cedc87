"""Flax modules: the UNet and the text encoders."""
