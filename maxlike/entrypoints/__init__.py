from maxlike.entrypoints.llm import LLM

__all__ = ["LLM"]
