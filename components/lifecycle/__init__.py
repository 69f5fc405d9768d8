"""Lifecycle: the model registry and what decides over runs. Imports every layer below.

Packaging and registration in MLflow, lineage tags, the champion/challenger promotion gate, sweeps, and
the rules for what a deployment's run form may change.
"""
