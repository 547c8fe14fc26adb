"""Operator-facing views of a running relay: its own endpoints, metrics, the status page and its figures."""
