"""Client side of relay: HTTP/1.1 parsing, limits, keep-alive, pipelining."""
