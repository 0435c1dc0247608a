from maxlike.engine.session import CompileStats, InferenceSession

__all__ = ["InferenceSession", "CompileStats"]
