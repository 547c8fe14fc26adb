"""Upstream side of relay: targets and balancing, pooled keep-alive connections, response relaying."""
