"""`hgad-edge serve`: a Triton Inference Server whose model `hgad` runs the torch-free runtime.

The `nvidia-pytriton` wheel ships a real `tritonserver` binary with its Python backend; `serve` runs
that binary itself, on a model repository it writes into a private workspace, so what a camera
station gets is what NVIDIA's container gives for `hgad-edge triton-repo` output: the same tensors
(read from the bundle's ONNX), the bundle metadata in the config's `parameters`, Triton's dynamic
batcher, health, statistics and Prometheus metrics:

    <workspace>/repository/hgad/config.pbtxt   backend python, dynamic batching, warm-up, metadata
    <workspace>/repository/hgad/1/model.py     imports backend_model.BundleModel (the runtime, per instance)
    <workspace>/repository/hgad/1/plan.json    bundle folder, backend, precision (never shown to clients)
    <workspace>/backends/python/               links to the wheel's Python backend and this Python's stub

Readiness is the model's: Triton loads `hgad` before it opens a port (explicit model control,
--load-model), runs the config's warm-up requests (batch 1 and max) through the model's `execute`,
and marks it READY only when they were answered; with --strict-readiness the server is ready only
while its model is. So `/v2/health/ready` (HTTP), ServerReady (gRPC) and the console's "ready" line
all mean "the model answers" (backend_model.py). Liveness is `/v2/health/live`.

Every request is checked before it joins a batch (class ids in range or -1, shapes, dtypes); a bad
one fails alone with one line naming the field, and no traceback or path leaves the server.

Reload: every RELOAD_POLL_S the bundle folder is looked at (metadata.json and the files it names, by
stat); when it changed and its metadata differs from what is served, the bundle is loaded and verified
here (sha256 of every model file, as at start) and Triton is asked to load the model again. Triton
keeps the served model answering until the new one has passed its warm-up, so stations see no gap;
a bundle that fails verification, or a load that fails, is logged and the previous bundle stays
served (it is tried again when the folder changes again). Stations follow the served metadata
(client.py): new thresholds apply to their next frames.

Before Triton starts, `serve` loads the bundle itself with the runtime (the same checks and messages
as `hgad-edge run`) and hands the backend and precision it resolved to the model instances. Taken
ports and a host that is not this machine's are refused with one line before anything starts.
Triton's admin APIs (model repository, shared memory, trace, logging) need a random token only this
process holds; inference, health, config, statistics and metrics are open to whoever reaches the
ports: `--host` is 127.0.0.1 unless the operator opens it.

Libpython trap: the Python-backend stub loads `libpython3.X.so.1.0` by name. When the interpreter is
not the system one (pyenv, conda, a venv over a source build), the stub would load the system library
with another stdlib and model load fails (e.g. `'_thread.RLock' object has no attribute
'_recursion_count'`). So Triton starts with LD_LIBRARY_PATH led by this interpreter's
`sysconfig.get_config_var("LIBDIR")` (`python_library_env`).

SIGTERM and Ctrl-C stop the server: Triton stops taking requests, answers those in flight (up to
EXIT_TIMEOUT_S), then the workspace and the shared-memory regions are removed. A server killed with
SIGKILL leaves its regions behind; the next `serve` removes those of dead servers.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import errno
import importlib.util
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hgad_edge
from hgad_edge.core.bundle import Bundle, load_bundle
from hgad_edge.core.errors import HgadRuntimeError
from hgad_edge.core.files import atomic_write_text
from hgad_edge.runtime.backends import create_runner
from hgad_edge.runtime.options import RuntimeOptions
from hgad_edge.runtime.triton.backend_model import PLAN_FILE, ModelPlan
from hgad_edge.runtime.triton.client import MODEL_CANDIDATES, model_parameters
from hgad_edge.runtime.triton.repository import Signature, config_text, read_signature

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
START_TIMEOUT_S = 600.0  # model load and warm-up (a TensorRT engine may take minutes)
RELOAD_POLL_S = 1.0  # how often the bundle folder is looked at
LOAD_TIMEOUT_S = 600.0
# Admin APIs that need the token; statistics stay open (read-only, for monitoring).
RESTRICTED = "shared-memory,model-repository,trace,logging"
TOKEN_HEADER = "triton-access-token"
SHM_PREFIX = "hgad-edge-serve-"  # /dev/shm regions of the Python backend: hgad-edge-serve-<serve pid>-...
SHM_SIZES = ("shm-default-byte-size=4194304", "shm-growth-byte-size=1048576")  # grown as batches need
WORKSPACE_PREFIX = "hgad-edge-serve-"
LOG_LINES = 200  # Triton log lines kept for error messages
_MODEL_PY = (
    '"""Written by `hgad-edge serve`: the runtime behind this model (hgad_edge.runtime.triton.backend_model)."""\n'
    "from hgad_edge.runtime.triton.backend_model import BundleModel as TritonPythonModel  # noqa: F401\n"
)
PORT_NAMES = ("gRPC", "HTTP", "metrics")


class ServeError(RuntimeError):
    """The server cannot start as asked (PyTriton missing, port taken, bad option); the message says the fix."""


@dataclass(frozen=True)
class ServeOptions:
    """The server's address, ports and batching, and the runtime each model instance runs (`runtime`): its
    max_batch is also the largest batch the dynamic batcher forms; thresholds are not the server's
    (stations apply theirs: `hgad-edge run --threshold`). host: 127.0.0.1 serves this machine only;
    0.0.0.0 every network it is on, to anyone who reaches the ports (inference is not authenticated)."""

    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    host: str = "127.0.0.1"
    queue_delay_us: int = 2000
    instances: int = 1
    runtime: RuntimeOptions = field(default_factory=lambda: RuntimeOptions(max_batch=16))

    @property
    def ports(self) -> tuple[int, int, int]:
        return (self.grpc_port, self.http_port, self.metrics_port)

    @property
    def local_host(self) -> str:
        """Where this machine reaches the server: loopback for a wildcard address."""
        if self.host in ("0.0.0.0", "", "::"):
            return "127.0.0.1"
        return f"[{self.host}]" if ":" in self.host else self.host


def python_library_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Environment whose LD_LIBRARY_PATH starts with this interpreter's libpython folder (module doc)."""
    env = dict(os.environ if environ is None else environ)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    rest = [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p and p != libdir]
    env["LD_LIBRARY_PATH"] = ":".join([libdir, *rest] if libdir else rest)
    return env


# ---- the tritonserver of the nvidia-pytriton wheel -------------------------------------------------
@dataclass(frozen=True)
class _Distribution:
    binary: Path
    libs: Path
    python_backend: Path  # libtriton_python.so, triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub for this Python


def _distribution() -> _Distribution:
    """Where the wheel keeps tritonserver (found without importing pytriton, which pulls in its own server)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServeError(f"`hgad-edge serve` needs nvidia-pytriton (its tritonserver binary): {SERVE_HINT}")
    root = Path(next(iter(spec.submodule_search_locations)))
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    libs = root.parent / "nvidia_pytriton.libs"
    dist = _Distribution(
        binary=root / "tritonserver" / "bin" / "tritonserver",
        libs=libs if libs.is_dir() else root / "tritonserver" / "external_libs",
        python_backend=root / "tritonserver" / "backends" / "python",
        stub=root / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub",
    )
    missing = [p for p in (dist.binary, dist.python_backend, dist.stub) if not p.exists()]
    if missing:
        raise ServeError(
            f"the nvidia-pytriton wheel lacks {missing[0]} (Python {version} supported?); reinstall it: {SERVE_HINT}"
        )
    return dist


# ---- checks before anything starts ---------------------------------------------------------------
def _check_options(options: ServeOptions) -> None:
    if len(set(options.ports)) != 3 or not all(0 < p < 65536 for p in options.ports):
        raise ServeError(f"gRPC, HTTP and metrics ports must be three different ports in 1..65535, got {options.ports}")
    if options.instances < 1 or options.queue_delay_us < 0:  # RuntimeOptions checked max_batch
        raise ServeError("--max-batch and --instances must be >= 1 and --queue-delay-us >= 0")
    if options.runtime.thresholds is not None:
        raise ServeError("the server serves raw scores: give threshold overrides to the stations (run --threshold)")


def _check_ports(options: ServeOptions) -> None:
    """One line naming the taken port (or the foreign --host) before Triton starts; Triton's own
    bind errors are mapped to the same line (`_startup_error`) for a port taken in between."""
    host = options.host or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for name, port in zip(PORT_NAMES, options.ports, strict=True):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to Triton too
            try:
                sock.bind((host, port))
            except socket.gaierror as err:
                raise ServeError(
                    f"--host {host!r} is not an address ({err.strerror}); use 127.0.0.1 or 0.0.0.0"
                ) from err
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    raise ServeError(_port_taken(name, port, host)) from err
                raise ServeError(
                    f"cannot listen on {host}:{port} ({err.strerror}); --host must be an address of this machine "
                    "(127.0.0.1: this machine only, 0.0.0.0: every network)"
                ) from err


def _port_taken(name: str, port: int, host: str) -> str:
    return (
        f"port {port} ({name}) is already in use on {host}: another `hgad-edge serve` or Triton server? "
        "stop it, or pick free ports with --grpc-port, --http-port and --metrics-port"
    )


# ---- the model: prepared here, loaded by Triton --------------------------------------------------
@dataclass
class _Model:
    """A bundle verified and resolved for serving: the config and plan Triton's model is loaded from."""

    bundle: Bundle
    config: str
    plan: ModelPlan
    description: str

    @property
    def metadata(self) -> dict[str, Any]:
        return self.bundle.metadata


def _prepare(bundle_path: Path, options: ServeOptions) -> _Model:
    """Load and verify the bundle, resolve the runtime (a runner is made and released), write nothing."""
    bundle = load_bundle(bundle_path)  # bad bundles fail before the server starts (or before a reload)
    runner = create_runner(bundle, options.runtime)
    try:
        backend, precision, max_batch = runner.name, runner.precision, runner.max_batch
        description = f"{runner.description}, {precision}, max batch {max_batch}, {options.instances} instance(s)"
        outputs = set(runner.output_names)
    finally:
        runner.deactivate()
    graph = read_signature(bundle.model_path("fp32" if "fp32" in bundle.models else "fp16"))
    # serve what the runtime reads from the graph (a newer graph may carry more outputs)
    signature = Signature(graph.inputs, tuple(t for t in graph.outputs if t.name in outputs))
    parameters = model_parameters(bundle.metadata, precision, signature.shapes)
    config = config_text(
        MODEL_NAME,
        "python",
        signature,
        max_batch,
        (max_batch,),
        options.queue_delay_us,
        options.instances,
        "cpu",  # the instance's runner picks its device itself (options.runtime.device)
        parameters,
    )
    plan = ModelPlan(
        str(Path(bundle_path).resolve()),
        backend,
        precision,
        options.runtime.device,
        max_batch,
        options.runtime.allow_engine_host_code,
    )
    return _Model(bundle, config, plan, description)


class _Workspace:
    """The private folder Triton runs from: its Python backend and the model repository (module doc)."""

    def __init__(self, dist: _Distribution) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=f"{WORKSPACE_PREFIX}{os.getpid()}-"))
        backend = self.path / "backends" / "python"
        backend.mkdir(parents=True)
        for source in (*sorted(dist.python_backend.iterdir()), dist.stub):
            if source.is_file():
                (backend / source.name).symlink_to(source)
        self.repository = self.path / "repository"
        self.version = self.repository / MODEL_NAME / "1"
        self.version.mkdir(parents=True)
        (self.version / "model.py").write_text(_MODEL_PY, encoding="utf-8")

    def write(self, model: _Model) -> tuple[str, str]:
        """Put `model` in place; returns what was there (config, plan) for `restore`."""
        config, plan = self.repository / MODEL_NAME / "config.pbtxt", self.version / PLAN_FILE
        before = (config.read_text() if config.exists() else "", plan.read_text() if plan.exists() else "")
        atomic_write_text(plan, model.plan.to_json())
        atomic_write_text(config, model.config)
        return before

    def restore(self, before: tuple[str, str]) -> None:
        atomic_write_text(self.version / PLAN_FILE, before[1])
        atomic_write_text(self.repository / MODEL_NAME / "config.pbtxt", before[0])

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(shm: Path = Path("/dev/shm"), tmp: Path | None = None) -> list[Path]:
    """Shared-memory regions and workspaces of `hgad-edge serve` processes that are gone (killed)."""
    removed = []
    for folder, prefix in ((shm, SHM_PREFIX), (Path(tmp or tempfile.gettempdir()), WORKSPACE_PREFIX)):
        for path in folder.glob(f"{prefix}*") if folder.is_dir() else ():
            pid = path.name[len(prefix) :].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                removed.append(path)
    return removed


# ---- the tritonserver process --------------------------------------------------------------------
def _die_with_parent() -> None:
    """In the child: SIGTERM when `serve` dies, so a killed `serve` never leaves Triton holding the ports."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _Triton:
    """tritonserver as a child process; its log goes to our stdout, the last lines are kept for messages."""

    def __init__(self, dist: _Distribution, workspace: _Workspace, options: ServeOptions) -> None:
        self.options = options
        self.token = secrets.token_urlsafe(32)
        self.lines: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        host = options.host or "0.0.0.0"
        restricted = f"{RESTRICTED}:{TOKEN_HEADER}={self.token}"
        cmd = [
            str(dist.binary),
            f"--model-repository={workspace.repository}",
            f"--backend-directory={workspace.path / 'backends'}",
            "--model-control-mode=explicit",
            f"--load-model={MODEL_NAME}",
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
            f"--grpc-address={host}",
            f"--grpc-port={options.grpc_port}",
            f"--http-address={host}",
            f"--http-port={options.http_port}",
            f"--metrics-address={host}",
            f"--metrics-port={options.metrics_port}",
            "--log-verbose=0",
            f"--backend-config=python,shm-region-prefix-name={SHM_PREFIX}{os.getpid()}-",
            *(f"--backend-config=python,{size}" for size in SHM_SIZES),
            f"--grpc-restricted-protocol={restricted}",
            f"--http-restricted-api={restricted}",
        ]
        env = python_library_env()
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (env["LD_LIBRARY_PATH"], str(dist.libs)) if p)
        env["PATH"] = os.pathsep.join((str(Path(sys.exec_prefix) / "bin"), env.get("PATH", "")))  # the stub's Python
        self.process = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=workspace.path,
            preexec_fn=_die_with_parent,
        )
        self._reader = threading.Thread(target=self._read_log, name="tritonserver log", daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:  # drained to the end: a full pipe would stall Triton
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            self.lines.append(line)
            try:
                print(line, flush=True)
            except (OSError, ValueError):  # our stdout is gone (a closed pipe): keep reading
                pass

    def alive(self) -> bool:
        return self.process.poll() is None

    def client(self) -> Any:
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(f"{self.options.local_host}:{self.options.grpc_port}")

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S, stop: threading.Event | None = None) -> bool:
        """Until the model answered its warm-up (Triton opens its ports only then): True; False when `stop`
        was set first (SIGTERM during the load); ServeError if Triton ended."""
        import tritonclient.grpc as grpcclient

        deadline = time.monotonic() + timeout_s
        client = self.client()
        try:
            while time.monotonic() < deadline:
                if stop is not None and stop.is_set():
                    return False
                if not self.alive():
                    self._reader.join(5)
                    raise ServeError(self._startup_error())
                try:
                    if client.is_server_ready(client_timeout=2) and client.is_model_ready(MODEL_NAME, client_timeout=2):
                        return True
                except grpcclient.InferenceServerException:
                    pass  # the ports open once the model is loaded
                time.sleep(0.1)
        finally:
            client.close()
        raise ServeError(
            f"Triton did not report model {MODEL_NAME!r} ready within {timeout_s:.0f} s; see its log above"
        )

    def _startup_error(self) -> str:
        """One line for a Triton that ended during start-up, from its log."""
        text = "\n".join(self.lines)
        for name, port in zip(PORT_NAMES, self.options.ports, strict=True):
            if f":{port}' already in use" in text or f":{port} already in use" in text:
                return _port_taken(name, port, self.options.host)
        errors = [line for line in self.lines if line[:1] == "E" or "error" in line.lower()]
        last = errors[-1] if errors else (self.lines[-1] if self.lines else "no output")
        return (
            f"Triton ended with code {self.process.returncode} while loading model {MODEL_NAME!r}: "
            f"{last.strip()[:400]} (its log is above)"
        )

    def load(self) -> None:
        """Load the model again from the repository (Triton keeps the old one serving until then)."""
        client = self.client()
        try:
            client.load_model(
                MODEL_NAME,
                headers={f"triton-grpc-protocol-{TOKEN_HEADER}": self.token},
                client_timeout=LOAD_TIMEOUT_S,
            )
        finally:
            client.close()

    def stop(self) -> int:
        """SIGINT: Triton stops taking requests, answers those in flight, exits; SIGKILL if it hangs."""
        if self.alive():
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(EXIT_TIMEOUT_S + 15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(15)
        self._reader.join(5)
        return int(self.process.returncode)


# ---- the running server --------------------------------------------------------------------------
def _folder_state(folder: Path) -> tuple[tuple[str, int, int, int], ...]:
    """stat of every file of the bundle folder (engines/ too), hidden ones (temporary, locks) left out."""
    state = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith("."):
                continue
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:  # removed between the listing and the stat: the next poll sees the folder settled
                continue
            state.append((os.path.relpath(os.path.join(root, name), folder), st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(sorted(state))


@dataclass
class RunningServer:
    """A started server: the Triton process, its workspace and the model it serves."""

    triton: _Triton
    workspace: _Workspace
    options: ServeOptions
    bundle_path: Path
    model: _Model
    announce: Callable[[str], None] = print
    reloads: int = 0
    _seen: tuple = ()

    @property
    def description(self) -> str:
        return self.model.description

    def is_alive(self) -> bool:
        return self.triton.alive()

    def reload_if_changed(self) -> bool:
        """Reload when the bundle folder changed and its metadata differs from the served one (module doc).

        Returns whether a new bundle is served now; failures are announced and the old bundle stays."""
        state = _folder_state(self.bundle_path)
        if state == self._seen:
            return False
        self._seen = state
        try:
            model = _prepare(self.bundle_path, self.options)
        except Exception as err:  # whatever is wrong with the new files, the served model goes on
            reason = str(err) if isinstance(err, (HgadRuntimeError, OSError)) else f"{type(err).__name__}: {err}"
            self.announce(
                f"hgad-edge serve: {self.bundle_path} changed but is not loaded: {reason}; "
                "still serving the previous bundle (tried again when the folder changes)"
            )
            return False
        if model.metadata == self.model.metadata:
            return False  # a file touched, nothing new to serve
        before = self.workspace.write(model)
        try:
            self.triton.load()
        except Exception as err:  # Triton refused the new model: the old one still answers
            self.workspace.restore(before)
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            self.announce(
                f"hgad-edge serve: {self.bundle_path} changed but Triton did not load it ({reason}); "
                "still serving the previous bundle"
            )
            return False
        self.model, self.reloads = model, self.reloads + 1
        thresholds = dict(zip(model.bundle.classes, model.bundle.thresholds, strict=True))
        self.announce(
            f"hgad-edge serve: reloaded {self.bundle_path} (reload {self.reloads}): thresholds {thresholds}; "
            "stations apply them from their next frames"
        )
        return True

    def stop(self) -> int:
        """Stop taking requests, answer those in flight, then remove the workspace."""
        try:
            return self.triton.stop()
        finally:
            self.workspace.remove()
            for region in Path("/dev/shm").glob(f"{SHM_PREFIX}{os.getpid()}-*"):
                region.unlink(missing_ok=True)


def start_server(
    bundle_path: Path | str,
    options: ServeOptions = ServeOptions(),
    announce: Callable[[str], None] = print,
    stop: threading.Event | None = None,
) -> RunningServer | None:
    """Start Triton with the bundle as model `hgad`; returns once the model answered its warm-up, or None
    (everything stopped again) when `stop` is set before."""
    _check_options(options)
    dist = _distribution()  # a missing extra fails before the bundle is read
    _check_ports(options)
    bundle_path = Path(bundle_path)
    seen = _folder_state(bundle_path) if bundle_path.is_dir() else ()
    model = _prepare(bundle_path, options)  # bad bundles and backends fail before the server starts
    remove_stale()
    workspace = _Workspace(dist)
    triton = None
    try:
        workspace.write(model)
        triton = _Triton(dist, workspace, options)
        ready = triton.wait_ready(stop=stop)
    except BaseException:
        if triton is not None:
            triton.stop()
        workspace.remove()
        raise
    server = RunningServer(triton, workspace, options, bundle_path, model, announce, _seen=seen)
    if not ready:
        server.stop()
        return None
    return server


def serve_forever(
    bundle_path: Path | str, options: ServeOptions = ServeOptions(), announce: Callable[[str], None] = print
) -> None:
    """Serve until SIGTERM / Ctrl-C (or the server dies), reloading a changed bundle; then stop cleanly."""
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server = start_server(bundle_path, options, announce, stop)
        if server is None:  # SIGTERM / Ctrl-C while the model loaded
            announce("hgad-edge serve: stopped before the model was ready")
            return
        shown = options.local_host
        loopback = options.host == "localhost" or options.host == "::1" or options.host.startswith("127.")
        reach = (
            f"listening on {options.host} only: this machine (--host 0.0.0.0 serves other machines)"
            if loopback
            else f"listening on {options.host}: anyone who reaches these ports can run inference (no authentication)"
        )
        announce(
            f"hgad-edge serve: model {MODEL_NAME!r} ({server.description}) ready: it answered its warm-up\n"
            f"  gRPC    grpc://{shown}:{options.grpc_port}   "
            f"camera stations: hgad-edge run grpc://<this host>:{options.grpc_port} SOURCE\n"
            f"  HTTP    http://{shown}:{options.http_port}   "
            f"readiness: /v2/health/ready, liveness: /v2/health/live, config: /v2/models/{MODEL_NAME}/config\n"
            f"  metrics http://{shown}:{options.metrics_port}/metrics (Prometheus)\n"
            f"  {reach}\n"
            f"  {bundle_path} is reloaded when its metadata.json changes (looked at every {RELOAD_POLL_S:g} s)\n"
            "  stop with Ctrl-C or SIGTERM (requests in flight are answered)"
        )
        try:
            while not stop.wait(RELOAD_POLL_S):
                if not server.is_alive():
                    raise ServeError(
                        f"the Triton server process ended unexpectedly (code {server.triton.process.returncode}); "
                        "see its log above"
                    )
                server.reload_if_changed()
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
    """`hgad-edge serve BUNDLE` in a child process (its own session) on loopback ports; `start` returns once
    the server's own readiness probe, HTTP /v2/health/ready, answers 200: what Kubernetes waits for.

    A server process (not a thread) keeps the clients and the served runtime off one GIL, as in
    production, and can be killed (`kill`: the whole process group, tritonserver and its stubs too)
    and started again on the same ports.
    """

    def __init__(
        self, bundle: Path | str, log_dir: Path | str, max_batch: int = 16, extra_args: tuple[str, ...] = ()
    ) -> None:
        self.bundle, self.log_dir = Path(bundle), Path(log_dir)
        self.max_batch, self.extra_args = int(max_batch), tuple(extra_args)
        self.grpc_port, self.http_port, self.metrics_port = free_ports(3)
        self.url = f"grpc://127.0.0.1:{self.grpc_port}"
        self.ready_url = f"http://127.0.0.1:{self.http_port}/v2/health/ready"
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.log = self.log_dir / "serve_0.log"

    def ports_free(self) -> bool:
        for port in (self.grpc_port, self.http_port, self.metrics_port):
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    return False
        return True

    def command(self) -> list[str]:
        return [
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

    def launch(self, timeout_s: float = 120.0) -> ServeProcess:
        """Start the process once the ports are free (a previous server may still be stopping); no wait."""
        deadline = time.monotonic() + timeout_s
        while not self.ports_free():
            if time.monotonic() > deadline:
                raise ServeError(f"ports {self.grpc_port}/{self.http_port}/{self.metrics_port} stay taken")
            time.sleep(0.2)
        self.starts += 1
        self.log = self.log_dir / f"serve_{self.starts}.log"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log_file:
            self.proc = subprocess.Popen(
                self.command(), stdout=log_file, stderr=subprocess.STDOUT, env=self._env(), start_new_session=True
            )
        return self

    def ready(self) -> bool:
        """The server's own readiness probe, as Kubernetes asks it."""
        try:
            with urllib.request.urlopen(self.ready_url, timeout=2) as answer:
                return answer.status == 200
        except OSError:  # refused while loading, 503 when not ready (HTTPError is an OSError)
            return False

    def start(self, timeout_s: float = 180.0) -> ServeProcess:
        deadline = time.monotonic() + timeout_s
        self.launch(timeout_s)
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServeError(f"hgad-edge serve exited with {self.proc.returncode}:\n{self.tail()}")
            if self.ready():
                return self
            time.sleep(0.1)
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

    def kill(self) -> None:
        """SIGKILL to `serve`, tritonserver and its stubs at once (a crash, an OOM kill of the pod)."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(30)

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM (requests in flight are answered), SIGKILL to the group if it does not end in time."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc is not None:
            try:  # nothing of it may outlive the test or benchmark that started it
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
