"""maxlike: an LLM inference runtime on JAX/XLA with the API of MAX's pipeline layer."""

__version__ = "0.1.0"
