"""Upstream side of relay: pooled keep-alive connections and response relaying."""
