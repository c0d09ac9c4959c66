"""Dagster assets, one module per lifecycle stage; each is a thin wrapper over domain code."""
