"""`hgad-edge serve`: an embedded Triton Inference Server (PyTriton) over the torch-free runtime.

The `nvidia-pytriton` wheel ships a real `tritonserver` binary (Python backend only); its model
`hgad` calls the runtime's runner (ONNX Runtime on CPU, TensorRT where an engine fits), so what a
camera station gets is the same as from NVIDIA's container serving `hgad-edge triton-repo` output:
the same tensors (read from the bundle's ONNX), the same metadata in the config's `parameters`,
Triton's dynamic batcher, health (`/v2/health/ready`), statistics and Prometheus metrics.

Libpython trap: Triton's Python-backend stub loads `libpython3.X.so.1.0` by name. When the
interpreter is not the system one (pyenv, conda, a venv over a source build), the stub would load
the system library with another stdlib and model load fails (e.g. `'_thread.RLock' object has no
attribute '_recursion_count'`). So the server starts with LD_LIBRARY_PATH led by this interpreter's
`sysconfig.get_config_var("LIBDIR")` (`python_library_env`).

SIGTERM and Ctrl-C stop the server: Triton stops taking requests, answers those in flight (up to
EXIT_TIMEOUT_S), then the runtime is released.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import hgad_edge
from hgad_edge.core.bundle import Bundle, load_bundle
from hgad_edge.runtime.backends import create_runner
from hgad_edge.runtime.options import RuntimeOptions
from hgad_edge.runtime.triton.client import MODEL_CANDIDATES, model_parameters
from hgad_edge.runtime.triton.repository import Signature, read_signature

__all__ = [
    "SERVE_HINT",
    "RunningServer",
    "ServeError",
    "ServeOptions",
    "ServeProcess",
    "free_ports",
    "python_library_env",
    "serve_forever",
    "start_server",
]

log = logging.getLogger("hgad_edge.serve")

SERVE_HINT = "pip install 'hgad-edge[serve]'"
MODEL_NAME = MODEL_CANDIDATES[0]  # what a bare grpc://host:port URL asks for
EXIT_TIMEOUT_S = 30  # how long a stopping server waits for requests in flight
# Admin endpoints PyTriton guards with a random token; statistics stay open (read-only, for monitoring).
RESTRICTED_ENDPOINTS = ["shared-memory", "model-repository", "trace", "logging"]
_NUMPY = {
    "TYPE_UINT8": np.uint8,
    "TYPE_INT64": np.int64,
    "TYPE_INT32": np.int32,
    "TYPE_FP32": np.float32,
    "TYPE_FP16": np.float16,
    "TYPE_BOOL": np.bool_,
}


class ServeError(RuntimeError):
    """The server cannot start as asked (PyTriton missing, port taken, bad option); the message says the fix."""


@dataclass(frozen=True)
class ServeOptions:
    """The server's ports and batching, and the runtime each model instance runs (`runtime`): its
    max_batch is also the largest batch the dynamic batcher forms; thresholds are not the server's
    (stations apply theirs: `hgad-edge run --threshold`)."""

    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    host: str = "0.0.0.0"
    queue_delay_us: int = 2000
    instances: int = 1
    runtime: RuntimeOptions = field(default_factory=lambda: RuntimeOptions(max_batch=16))


def python_library_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Environment whose LD_LIBRARY_PATH starts with this interpreter's libpython folder (module doc)."""
    env = dict(os.environ if environ is None else environ)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    rest = [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p and p != libdir]
    env["LD_LIBRARY_PATH"] = ":".join([libdir, *rest] if libdir else rest)
    return env


class _ModelInstance:
    """One model instance: a runtime runner fed from Triton's batches (one call at a time)."""

    def __init__(self, bundle: Bundle, signature: Signature, options: ServeOptions) -> None:
        self.runner = create_runner(bundle, options.runtime)
        # serve what the runtime reads from the graph (a newer graph may carry more outputs)
        outputs = tuple(t for t in signature.outputs if t.name in self.runner.output_names)
        self.signature = Signature(signature.inputs, outputs)
        self.classes = len(bundle.classes)
        self.runner.infer(self.runner.max_batch)  # warm-up at the largest batch before the first request

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        batch = int(next(iter(inputs.values())).shape[0])
        for tensor in self.signature.inputs:
            self.runner.inputs[tensor.name][:batch] = inputs[tensor.name].reshape(batch, *tensor.shape)
        out = self.runner.infer(batch)
        # astype copies (the runner's buffers are reused) and gives the exact numpy type PyTriton checks
        # (ORT's int64 outputs are np.longlong, which PyTriton tells apart from np.int64)
        return {t.name: out[t.name].reshape(batch, *t.dims).astype(_NUMPY[t.data_type]) for t in self.signature.outputs}


def _import_pytriton() -> Any:
    try:
        import pytriton.triton as triton_module
        from pytriton.decorators import batch
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    except ImportError as err:
        raise ServeError(f"`hgad-edge serve` needs nvidia-pytriton ({err}): {SERVE_HINT}") from err
    return triton_module, batch, DynamicBatcher, ModelConfig, Tensor


def _check_options(options: ServeOptions) -> None:
    ports = (options.grpc_port, options.http_port, options.metrics_port)
    if len(set(ports)) != 3 or not all(0 < p < 65536 for p in ports):
        raise ServeError(f"gRPC, HTTP and metrics ports must be three different ports in 1..65535, got {ports}")
    if options.instances < 1 or options.queue_delay_us < 0:  # RuntimeOptions checked max_batch
        raise ServeError("--max-batch and --instances must be >= 1 and --queue-delay-us >= 0")
    if options.runtime.thresholds is not None:
        raise ServeError("the server serves raw scores: give threshold overrides to the stations (run --threshold)")


@dataclass
class RunningServer:
    """A started server: PyTriton's Triton object and the runtimes behind its model instances."""

    triton: Any
    instances: list[_ModelInstance]
    options: ServeOptions
    description: str

    def is_alive(self) -> bool:
        return bool(self.triton.is_alive())

    def stop(self) -> None:
        """Stop taking requests, answer those in flight, then release the runtimes."""
        self.triton.stop()
        for instance in self.instances:
            instance.runner.deactivate()


def start_server(bundle_path: Path | str, options: ServeOptions = ServeOptions()) -> RunningServer:
    """Start Triton with the bundle bound as model `hgad` (returns once it is ready)."""
    _check_options(options)
    _import_pytriton()  # a missing extra fails before the bundle is read
    bundle = load_bundle(bundle_path)  # bad bundles fail before the server starts
    precision_file = bundle.model_path("fp32" if "fp32" in bundle.models else "fp16")
    signature = read_signature(precision_file)
    instances: list[_ModelInstance] = []
    try:
        return _start(bundle, signature, options, instances)
    except BaseException:
        for instance in instances:
            instance.runner.deactivate()
        raise


def _start(
    bundle: Bundle, signature: Signature, options: ServeOptions, instances: list[_ModelInstance]
) -> RunningServer:
    triton_module, batch, DynamicBatcher, ModelConfig, Tensor = _import_pytriton()
    instances.extend(_ModelInstance(bundle, signature, options) for _ in range(options.instances))
    precision = instances[0].runner.precision
    signature = instances[0].signature
    os.environ.update(python_library_env())  # read by PyTriton when it launches tritonserver (module doc)
    config = triton_module.TritonConfig(
        grpc_port=options.grpc_port,
        http_port=options.http_port,
        metrics_port=options.metrics_port,
        grpc_address=options.host,
        http_address=options.host,
        metrics_address=options.host,
        exit_timeout_secs=EXIT_TIMEOUT_S,
        log_verbose=0,
    )
    security = triton_module.TritonSecurityConfig(restricted_endpoints=list(RESTRICTED_ENDPOINTS))
    server = triton_module.Triton(config=config, security_config=security)
    tensors = [Tensor(name=t.name, dtype=_NUMPY[t.data_type], shape=t.dims) for t in signature.inputs]
    outputs = [Tensor(name=t.name, dtype=_NUMPY[t.data_type], shape=t.dims) for t in signature.outputs]
    batcher = DynamicBatcher(
        max_queue_delay_microseconds=options.queue_delay_us, preferred_batch_size=[options.runtime.max_batch]
    )
    server.bind(
        model_name=MODEL_NAME,
        infer_func=[batch(instance) for instance in instances],
        inputs=tensors,
        outputs=outputs,
        config=ModelConfig(max_batch_size=options.runtime.max_batch, batcher=batcher),
        strict=True,
    )
    _add_parameters(server, model_parameters(bundle.metadata, precision, signature.shapes))
    try:
        server.run()
    except Exception as err:
        server.stop()
        ports = f"{options.grpc_port}/{options.http_port}/{options.metrics_port}"
        msg = f"Triton did not start ({type(err).__name__}: {err}); is a port of {ports} taken? pick others"
        raise ServeError(msg) from err
    runtime = instances[0].runner.description
    description = f"{runtime}, {precision}, max batch {options.runtime.max_batch}, {options.instances} instance(s)"
    return RunningServer(server, instances, options, description)


def _add_parameters(server: Any, parameters: dict[str, str]) -> None:
    """Put the bundle metadata into the served config's `parameters`.

    PyTriton's public ModelConfig has no `parameters`; its generated Triton config does (backend
    parameters), so they are added there before the config is written. tests/test_serve.py reads
    them back from the running server, so a PyTriton change that breaks this fails a test.
    """
    for model in server._model_manager.models:
        if model.model_name == MODEL_NAME:
            model._get_triton_model_config().backend_parameters.update(parameters)
            return
    raise ServeError(
        f"PyTriton lost the bound model {MODEL_NAME!r}; this PyTriton version is not supported ({SERVE_HINT})"
    )


def serve_forever(
    bundle_path: Path | str, options: ServeOptions = ServeOptions(), announce: Callable[[str], None] = print
) -> None:
    """Serve until SIGTERM / Ctrl-C (or the server dies), then stop cleanly (module doc)."""
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server = start_server(bundle_path, options)
        shown = "127.0.0.1" if options.host in ("0.0.0.0", "::") else options.host
        announce(
            f"hgad-edge serve: model {MODEL_NAME!r} ({server.description}) ready\n"
            f"  gRPC    grpc://{shown}:{options.grpc_port}   "
            f"camera stations: hgad-edge run grpc://<this host>:{options.grpc_port} SOURCE\n"
            f"  HTTP    http://{shown}:{options.http_port}   "
            f"health: /v2/health/ready, config: /v2/models/{MODEL_NAME}/config\n"
            f"  metrics http://{shown}:{options.metrics_port}/metrics (Prometheus)\n"
            "  stop with Ctrl-C or SIGTERM (requests in flight are answered)"
        )
        try:
            while not stop.wait(1.0):
                if not server.is_alive():
                    raise ServeError("the Triton server process ended unexpectedly; see its log above")
        finally:
            announce("hgad-edge serve: stopping (answering requests in flight)")
            server.stop()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    announce("hgad-edge serve: stopped")


# ---- `hgad-edge serve` as a child process (tests, benchmarks, scripts) -----------------------------
def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports the OS reports free right now."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


class ServeProcess:
    """`hgad-edge serve BUNDLE` in a child process on loopback ports; `start` returns once it is ready.

    A server process (not a thread) keeps Triton's clients and the served runtime off one GIL, as in
    production, and can be killed and started again on the same ports.
    """

    def __init__(
        self, bundle: Path | str, log_dir: Path | str, max_batch: int = 16, extra_args: tuple[str, ...] = ()
    ) -> None:
        self.bundle, self.log_dir = Path(bundle), Path(log_dir)
        self.max_batch, self.extra_args = int(max_batch), tuple(extra_args)
        self.grpc_port, self.http_port, self.metrics_port = free_ports(3)
        self.url = f"grpc://127.0.0.1:{self.grpc_port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.log = self.log_dir / "serve_0.log"

    def ports_free(self) -> bool:
        for port in (self.grpc_port, self.http_port, self.metrics_port):
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    return False
        return True

    def start(self, timeout_s: float = 120.0) -> ServeProcess:
        import tritonclient.grpc as grpcclient

        deadline = time.monotonic() + timeout_s
        while not self.ports_free():  # a previous server on these ports may still be shutting down
            if time.monotonic() > deadline:
                raise ServeError(f"ports {self.grpc_port}/{self.http_port}/{self.metrics_port} stay taken")
            time.sleep(0.2)
        self.starts += 1
        self.log = self.log_dir / f"serve_{self.starts}.log"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "hgad_edge.cli",
            "serve",
            str(self.bundle),
            "--host",
            "127.0.0.1",
            "--grpc-port",
            str(self.grpc_port),
            "--http-port",
            str(self.http_port),
            "--metrics-port",
            str(self.metrics_port),
            "--max-batch",
            str(self.max_batch),
            *self.extra_args,
        ]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self._env())
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{self.grpc_port}")
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise ServeError(f"hgad-edge serve exited with {self.proc.returncode}:\n{self.tail()}")
                try:
                    if client.is_model_ready(MODEL_NAME):
                        return self
                except grpcclient.InferenceServerException:
                    pass
                time.sleep(0.2)
        finally:
            client.close()
        self.stop()
        raise ServeError(f"hgad-edge serve not ready after {timeout_s:.0f} s:\n{self.tail()}")

    @staticmethod
    def _env() -> dict[str, str]:
        """The child imports the same hgad_edge as this process (a checkout or site-packages)."""
        home = str(Path(hgad_edge.__file__).resolve().parents[1])  # the folder that holds the hgad_edge package
        return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (home, os.environ.get("PYTHONPATH", "")) if p)}

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def stop(self, timeout_s: float = 45.0) -> None:
        """SIGTERM (requests in flight are answered), SIGKILL if it does not end in time."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
