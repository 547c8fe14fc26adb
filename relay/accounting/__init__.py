"""What a finished request counts as: usage, cost, totals, the request log."""
