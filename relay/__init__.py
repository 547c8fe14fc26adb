"""relay: a high-performance AI API gateway.

A drop-in base URL for OpenAI, Anthropic and compatible APIs that adds
response caching, rate limiting, circuit breaking, token and cost tracking
and Prometheus metrics, while adding as little as possible to each request.
"""

__version__ = "0.1.0"
