"""Operator-facing views of a running relay: the status page and its figures."""
