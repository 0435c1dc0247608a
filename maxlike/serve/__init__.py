"""The OpenAI-compatible server (`maxlike serve`) and its benchmark client (`maxlike bench-serve`).

engine.py: the thread that owns the model and steps the scheduler; app.py: the FastAPI routes;
protocol.py: OpenAI's bodies and errors; metrics.py: Prometheus; server.py: uvicorn, signals,
multi-host followers; benchmark.py: the load generator (any OpenAI-compatible server).
"""
