"""Shipped scenario files (package data): `addin-sim run --scenario NAME`."""
