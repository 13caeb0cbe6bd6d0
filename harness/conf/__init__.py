"""Hydra config groups of the harness (a package so hydra can find it as harness.conf)."""
