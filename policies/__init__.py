"""Pluggable policies: capacity and micro-batch schedulers, KV-cache managers."""
