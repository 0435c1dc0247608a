"""`maxlike serve`: uvicorn in front of the engine thread, and the multi-host followers.

The port answers as soon as uvicorn starts: `/health` is 503 while the weights load and every
bucket is compiled (or read from the executable cache), 200 after. SIGTERM or Ctrl-C: uvicorn stops
taking connections and waits up to `shutdown_grace_s` for the responses in flight; then the engine
finishes what is left (nothing, or requests whose clients went away, aborted) and the process exits 0.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import threading
from typing import Callable

import numpy as np

from maxlike.config import PipelineConfig
from maxlike.serve.app import ServerSettings, build_app
from maxlike.serve.engine import Engine, local_exchange
from maxlike.serve.metrics import Metrics

log = logging.getLogger("maxlike.serve")


def default_served_name(config: PipelineConfig) -> str:
    """The model folder's or file's name, as `vllm serve` and `max serve` name a local model."""
    return os.path.basename(os.path.normpath(config.model.model_path))


def llm_factory(config: PipelineConfig, *, progress: bool = True) -> Callable:
    def load():
        from maxlike.entrypoints.llm import LLM

        return LLM(config, progress=progress)

    return load


def run_in_thread(app, host: str, port: int, log_level: str = "warning"):
    """uvicorn serving `app` on a background thread (tests, benchmarks); returns the server once it
    listens. Stop it with `server.should_exit = True`."""
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start listening on {host}:{port} within 30 s")
        time.sleep(0.02)
    return server


def broadcast_exchange() -> Callable[[list], list]:
    """Multi-host: process 0's commands, pickled, to every process (two collectives per step: the
    size, then the bytes, padded to a power of two so a handful of shapes is ever compiled). The
    peers are processes of one job running maxlike's own code."""
    from jax.experimental import multihost_utils

    def exchange(commands: list) -> list:
        data = pickle.dumps(commands)
        size = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
        buf = np.zeros(max(1024, 1 << (size - 1).bit_length()), np.uint8)
        buf[: len(data)] = np.frombuffer(data, np.uint8)[: buf.size]  # a follower's buffer is ignored
        got = np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8)
        return pickle.loads(got[:size].tobytes())  # noqa: S301 - from process 0 of this job

    return exchange


def serve(config: PipelineConfig, settings: ServerSettings, *, host: str = "127.0.0.1", port: int = 8000,
          shutdown_grace_s: float = 30.0, progress: bool = True, log_level: str = "info") -> int:
    """Serve until SIGTERM / Ctrl-C. Process 0 of a multi-host job serves HTTP; the others follow."""
    import jax
    import uvicorn

    multi = config.num_processes is not None and config.num_processes > 1
    if multi:  # join the job first: every process must load the model in the same order
        from maxlike.engine.mesh import initialize_distributed

        initialize_distributed(config)
    exchange = broadcast_exchange() if multi else local_exchange
    lead = not multi or jax.process_index() == 0
    metrics = Metrics()
    engine = Engine(llm_factory(config, progress=progress and lead), metrics=metrics, exchange=exchange, lead=lead)
    if not lead:
        engine.run()  # steps with process 0 until it broadcasts the stop
        return 1 if engine.load_error is not None else 0
    app = build_app(engine, settings, metrics)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=shutdown_grace_s, lifespan="off"))
    engine.start()

    def stop_on_load_error():
        engine.ready.wait()
        if engine.load_error is not None:
            server.should_exit = True

    threading.Thread(target=stop_on_load_error, daemon=True).start()
    if threading.current_thread() is threading.main_thread():
        # uvicorn handles SIGTERM / SIGINT while it runs, then raises them again for the handlers that were
        # there before it: these make that a clean exit (0) instead of a kill or a KeyboardInterrupt traceback.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
    server.run()
    engine.shutdown(timeout=shutdown_grace_s + 5)
    if engine.load_error is not None:
        print(f"maxlike serve: the model failed to load: {type(engine.load_error).__name__}: {engine.load_error}")
        return 1
    return 0
