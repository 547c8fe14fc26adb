"""Features on the request path: response cache, coalescing, rate limits, circuit breakers."""
