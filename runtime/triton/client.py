"""Triton client backend: a bundle served by a Triton Inference Server, scored from a camera station.

    create("grpc://server:8001")              the served hgad model (see MODEL_CANDIDATES)
    create("grpc://server:8001/hgad_trt_fp16") one model of a repository by name

Frames are resized here (the runtime's BatchPacker) and travel as uint8 at the model's input size,
never as float. The server returns the graph's outputs; the host-side steps after them are the
runtime's own (api.py), so a `Result` from a server equals one from local inference. For a tiled
bundle (metadata `tiling`, read from the served config like the rest) the frames are cut into tiles
here and the tiles travel as the batch; stitching and the frame score happen here too (tiles.py).

What the client knows about the model comes from the server: `hgad-edge serve` and
`hgad-edge triton-repo` put the bundle's metadata into the model config's `parameters`
(`model_parameters` writes them, `bundle_from_config` reads them), and `connect` refuses a model
whose metadata is missing, of another format/major version, or disagrees with its own tensors.

A server that is not there, and a server that answers but does not serve the model yet (still
loading it, or never: a typo in the URL), are the same outage to a station: `connect` and `infer`
raise `ServerUnavailableError` (a BackendUnavailableError: the frame is lost, the caller counts it or
waits) and the next attempts wait an exponential backoff, each on a fresh gRPC channel (gRPC's own
reconnect backoff grows to minutes). Before the first frame after an outage, and every
CONFIG_CHECK_S while frames flow, the served config is read again: the same model recalibrated on the
server (new thresholds, `hgad-edge serve` reloads a bundle whose metadata changed) is followed from
the next frame on (`TritonRunner.bundle`); another model (classes, input size, tiling, weights) is an
error, not a silent swap.

A URL may carry user info, grpc://user:password@host:8001, for a proxy in front of the server (sent
as HTTP basic auth); every message and log line shows the URL masked (hgad_edge.core.redact).
`tritonclient[grpc]` is imported only when this backend is used.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np

from hgad_edge.core.bundle import Bundle
from hgad_edge.core.bundle_schema import BundleMetadata, SchemaError
from hgad_edge.core.errors import BackendUnavailableError, BundleError, InferenceError, InvalidArgumentError, Status
from hgad_edge.core.redact import redact_url
from hgad_edge.runtime.backends.base import Runner, TensorSpec

__all__ = [
    "METADATA_PARAMETER",
    "MODEL_CANDIDATES",
    "PRECISION_PARAMETER",
    "ServerUnavailableError",
    "TritonRunner",
    "bundle_from_config",
    "connect",
    "is_server_url",
    "model_parameters",
    "parse_url",
    "require_client",
    "url_credentials",
]

log = logging.getLogger("hgad_edge.runtime")

SCHEME = "grpc://"
DEFAULT_PORT = 8001  # Triton's gRPC port
# Served model names, in the order a bare URL tries them: `hgad-edge serve` serves "hgad"; a
# repository from `hgad-edge triton-repo` holds the others (TensorRT first: it is why one runs Triton).
MODEL_CANDIDATES = ("hgad", "hgad_trt_fp16", "hgad_trt_int8", "hgad_trt_fp32", "hgad_onnx_fp16", "hgad_onnx_fp32")
METADATA_PARAMETER = "hgad_edge.metadata"  # the bundle's metadata.json, as JSON
PRECISION_PARAMETER = "hgad_edge.precision"  # the served graph/engine: fp32, fp16 or int8
# Per-sample shapes in the graph, {name: [dims]}: Triton declares a (B,) tensor as dims [1] (with
# reshape [] where the backend allows it), so the client needs the graph's own shape for its buffers.
SHAPES_PARAMETER = "hgad_edge.graph_shapes"
READABLE_KEYS = (
    "classes",
    "input_size",
    "tiling",
    "thresholds",
    "format_version",
    "package_version",
    "checkpoint_sha256",
)
TIMEOUT_S = 10.0  # per request; a server that takes longer counts as unreachable
BACKOFF_S, BACKOFF_MAX_S = 0.25, 5.0  # between reconnect attempts while the server is away
CONFIG_CHECK_S = 2.0  # how often a streaming client reads the served config again (a recalibrated bundle)
# gRPC status codes that mean "the server or its model is not there (yet)" rather than "this request is wrong".
TRANSIENT_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "NOT_FOUND", "RESOURCE_EXHAUSTED")
_CLIENT_HINT = "pip install 'tritonclient[grpc]' (or hgad-edge[serve])"
_DTYPES = {
    "TYPE_UINT8": np.uint8,
    "TYPE_INT64": np.int64,
    "TYPE_FP32": np.float32,
    "TYPE_FP16": np.float16,
    "TYPE_BOOL": np.bool_,
    "TYPE_INT32": np.int32,
}
_HOST_PART = re.compile(r"([^/:@\[\]]+|\[[^\]]+\])(?::(\d+))?(?:/([A-Za-z0-9_.-]*))?/?")


class ServerUnavailableError(BackendUnavailableError):
    """The inference server, or its model, cannot be reached right now; this frame is lost, later ones may pass."""


def is_server_url(target: Any) -> bool:
    return isinstance(target, str) and target.startswith(SCHEME)


def _split_url(url: str) -> tuple[str, str, str | None, str]:
    """(user info, host, port or None, model part) of grpc://[user[:password]@]host[:port][/model]."""
    text = str(url).strip()
    rest = text[len(SCHEME) :] if text.startswith(SCHEME) else None
    # the LAST '@' ends the user info: a password may hold '@', ':' and '/', a host and a model name may not
    userinfo, at, hostpart = (rest or "").rpartition("@")
    match = _HOST_PART.fullmatch(hostpart) if rest is not None else None
    port = match.group(2) if match else None
    if not match or (at and not userinfo) or (port is not None and not 0 < int(port) < 65536):
        raise InvalidArgumentError(
            f"bad server URL {redact_url(text)!r}: use grpc://host:port or grpc://host:port/model, "
            "e.g. grpc://127.0.0.1:8001"
        )
    return userinfo, match.group(1), port, match.group(3) or ""


def parse_url(url: str) -> tuple[str, str | None]:
    """grpc://[user[:password]@]host[:port][/model] -> ("host:port", model or None)."""
    _, host, port, model = _split_url(url)
    return f"{host}:{port or DEFAULT_PORT}", model or None


def url_credentials(url: str) -> tuple[str, str] | None:
    """(user, password) of a URL's user info (percent-decoded), or None when it has none."""
    userinfo = _split_url(url)[0]
    if not userinfo:
        return None
    user, _, password = userinfo.partition(":")
    return unquote(user), unquote(password)


def _open_client(address: str, credentials: tuple[str, str] | None) -> Any:
    """A gRPC client of the server; user info in the URL goes out as HTTP basic auth (a proxy checks it)."""
    grpc = _import_client()
    client = grpc.InferenceServerClient(address)
    if credentials is not None:
        from tritonclient.grpc.auth import BasicAuth

        client.register_plugin(BasicAuth(*credentials))
    return client


def model_parameters(
    metadata: dict[str, Any], precision: str, graph_shapes: dict[str, tuple[int, ...]]
) -> dict[str, str]:
    """Config `parameters` that make a served model self-describing (string values, JSON inside)."""
    params = {
        METADATA_PARAMETER: json.dumps(metadata, sort_keys=True, separators=(",", ":")),
        PRECISION_PARAMETER: precision,
        SHAPES_PARAMETER: json.dumps(
            {name: list(shape) for name, shape in graph_shapes.items()}, separators=(",", ":")
        ),
    }
    for key in READABLE_KEYS:  # for people reading the config (curl .../config); clients use METADATA_PARAMETER
        if key in metadata:
            params[f"hgad_edge.{key}"] = json.dumps(metadata[key])
    return params


def _parameters(config: dict[str, Any]) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}


def _dims(tensor: dict[str, Any]) -> tuple[int, ...]:
    return tuple(int(d) for d in tensor.get("dims", []))


def graph_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Per-sample graph shape of every served tensor (see SHAPES_PARAMETER)."""
    shapes = json.loads(_parameters(config).get(SHAPES_PARAMETER, "{}"))
    return {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}


def bundle_from_config(config: dict[str, Any], url: str) -> tuple[Bundle, str]:
    """(Bundle, precision) of a served model from its config (JSON form); BundleError naming the fix."""
    name = config.get("name", "?")
    params = _parameters(config)
    if METADATA_PARAMETER not in params:
        msg = (
            f"model {name!r} at {url} carries no hgad-edge metadata (config parameter {METADATA_PARAMETER!r}); "
            "serve the bundle with `hgad-edge serve BUNDLE` or write the repository with "
            "`hgad-edge triton-repo BUNDLE REPO`"
        )
        raise BundleError(msg, Status.BUNDLE_INCOMPATIBLE)
    try:
        meta = json.loads(params[METADATA_PARAMETER])
    except json.JSONDecodeError as err:
        raise BundleError(
            f"model {name!r} at {url}: damaged {METADATA_PARAMETER} ({err}); rewrite its repository",
            Status.BUNDLE_INCOMPATIBLE,
        ) from err
    where = f"model {name!r} at {url}"
    try:
        schema = BundleMetadata.from_json(meta)
    except SchemaError as err:
        msg = f"{where}: its bundle metadata is not usable here ({err}); serve a bundle of this hgad-edge version"
        raise BundleError(msg, Status.BUNDLE_INCOMPATIBLE) from err
    bundle = Bundle(Path(where), meta, schema)  # no files: the model lives on the server
    _check_tensors(config, bundle, where)
    return bundle, params.get(PRECISION_PARAMETER, "fp32")


def _check_tensors(config: dict[str, Any], bundle: Bundle, where: str) -> None:
    """The served tensors must be the ones the metadata describes (input size, classes, outputs)."""
    inputs = {t["name"]: t for t in config.get("input", [])}
    outputs = {t["name"] for t in config.get("output", [])}
    want = (*bundle.input_size, 3)
    images = inputs.get(bundle.input_name)
    if images is None or _dims(images) != want or images.get("data_type") != "TYPE_UINT8":
        got = (_dims(images), images.get("data_type")) if images else "no such input"
        msg = (
            f"{where} does not take uint8 images {list(want)} as {bundle.input_name!r} (it has {got}); "
            "its metadata and model disagree: rewrite the repository from one bundle"
        )
        raise BundleError(msg, Status.BUNDLE_INCOMPATIBLE)
    if bundle.class_input_name not in inputs:
        raise BundleError(
            f"{where} has no class input {bundle.class_input_name!r}; rewrite the repository from the bundle",
            Status.BUNDLE_INCOMPATIBLE,
        )
    missing = [n for n in bundle.schema.outputs if n not in outputs]
    missing += [n for n in (*inputs, *outputs) if n not in graph_shapes(config)]
    if missing:
        raise BundleError(
            f"{where} lacks outputs {missing} its metadata names; rewrite the repository from the bundle",
            Status.BUNDLE_INCOMPATIBLE,
        )


def identity(bundle: Bundle) -> tuple[Any, ...]:
    """What must not change under a client: the model's classes, input size, tiling and weights (thresholds may)."""
    return (
        bundle.classes,
        bundle.input_size,
        bundle.tiling,
        bundle.metadata.get("checkpoint_sha256"),
        bundle.metadata.get("package_version"),
    )


def _import_client() -> Any:
    try:
        import tritonclient.grpc as grpcclient
    except ImportError as err:
        raise BackendUnavailableError(f"the triton backend needs tritonclient ({err}); {_CLIENT_HINT}") from err
    return grpcclient


def require_client() -> None:
    """BackendUnavailableError naming the install when tritonclient is missing (no point waiting for a server)."""
    _import_client()


def _code(err: Exception) -> str:
    status = getattr(err, "status", lambda: None)()
    return str(status or "").replace("StatusCode.", "")


def _reason(err: Exception) -> str:
    """One line of a gRPC error for messages (tritonclient quotes the address, never the user info)."""
    text = str(err).splitlines()[0][:200] if str(err) else _code(err)
    return f"{type(err).__name__}: {text}"


def _transient(err: Exception) -> bool:
    return _code(err) in TRANSIENT_CODES or not _code(err)


class TritonRunner(Runner):
    """Sends the first `batch` rows of `inputs` to the server and copies its answers into `outputs`.

    `bundle` is what the server serves: replaced when the served metadata changes under the same
    model (a recalibration), so the caller's PASS/FAIL follows the server's thresholds."""

    name = "triton"

    def __init__(
        self,
        url: str,
        model: str,
        bundle: Bundle,
        config: dict[str, Any],
        input_specs: list[TensorSpec],
        output_names: list[str],
        max_batch: int,
        timeout_s: float = TIMEOUT_S,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        super().__init__(input_specs, output_names, max_batch)
        self.url, self.model, self.bundle, self.config = url, model, bundle, config
        self.address, _ = parse_url(url)
        self.timeout_s = float(timeout_s)
        self.credentials = credentials
        self.client: Any = None
        self.failures = 0  # consecutive failed attempts; > 0 while the server is away
        self.reconnects = 0
        self.retry_at = 0.0
        self.check_at = time.monotonic() + CONFIG_CHECK_S
        self.last_failure = ""
        self._served = _parameters(config).get(METADATA_PARAMETER)
        self._shapes = graph_shapes(config)
        self._input_dims = {t["name"]: _dims(t) for t in config.get("input", [])}
        self._input_types = {
            t["name"]: str(t.get("data_type", "")).replace("TYPE_", "") for t in config.get("input", [])
        }

    def activate_impl(self) -> None:
        grpc = _import_client()
        self.client = self.client or _open_client(self.address, self.credentials)
        self.inputs = {s.name: np.zeros((self.max_batch, *s.shape), s.dtype) for s in self.input_specs}
        dtypes = {t["name"]: _DTYPES.get(t.get("data_type"), np.float32) for t in self.config.get("output", [])}
        self.outputs = {n: np.empty((self.max_batch, *self._shapes[n]), dtypes[n]) for n in self.output_names}
        self._requested = [grpc.InferRequestedOutput(n) for n in self.output_names]
        self.description = f"triton {self.url} model {self.model!r} (server precision {self.precision})"

    def _request(self, batch: int) -> list[Any]:
        grpc = _import_client()
        requests = []
        for spec in self.input_specs:
            data = self.inputs[spec.name][:batch].reshape(batch, *self._input_dims[spec.name])
            tensor = grpc.InferInput(spec.name, list(data.shape), self._input_types[spec.name])
            tensor.set_data_from_numpy(np.ascontiguousarray(data))
            requests.append(tensor)
        return requests

    def infer_impl(self, batch: int) -> None:
        now = time.monotonic()
        if self.failures and now < self.retry_at:
            wait = self.retry_at - now
            msg = f"inference server {self.url} is unreachable ({self.last_failure}); next attempt in {wait:.1f} s"
            raise ServerUnavailableError(msg)
        grpc = _import_client()
        try:
            if self.failures:  # a fresh channel: gRPC's own reconnect backoff would wait far longer
                self._reopen()
            if self.failures or now >= self.check_at:  # the model is checked before a frame goes to it
                self._follow_served_model()
            answer = self.client.infer(
                self.model, self._request(batch), outputs=self._requested, client_timeout=self.timeout_s
            )
        except grpc.InferenceServerException as err:
            if _transient(err):
                self._failed(err)
                raise ServerUnavailableError(
                    f"inference server {self.url} is unreachable: {self.last_failure}"
                ) from err
            raise InferenceError(f"the server refused a batch of {batch} for model {self.model!r}: {err}") from err
        if self.failures:
            self.failures, self.reconnects = 0, self.reconnects + 1
            log.warning("inference server %s is back (reconnect %d)", self.url, self.reconnects)
        for name in self.output_names:
            np.copyto(self.outputs[name][:batch], answer.as_numpy(name).reshape(self.outputs[name][:batch].shape))

    def _failed(self, err: Exception) -> None:
        self.failures += 1
        self.last_failure = _reason(err)
        self.retry_at = time.monotonic() + min(BACKOFF_S * 2 ** (self.failures - 1), BACKOFF_MAX_S)
        if self.failures == 1:
            log.warning(
                "inference server %s went away (%s); frames are dropped until it is back", self.url, self.last_failure
            )

    def _reopen(self) -> None:
        try:
            self.client.close()
        except Exception:  # the old channel is dead anyway
            pass
        self.client = _open_client(self.address, self.credentials)

    def _follow_served_model(self) -> None:
        """Read the served config: the same model with new metadata (recalibrated) is followed, another is an error.

        An unknown or unloaded model raises tritonclient's NOT_FOUND / UNAVAILABLE error: an outage."""
        self.check_at = time.monotonic() + CONFIG_CHECK_S
        config = self.client.get_model_config(self.model, as_json=True, client_timeout=self.timeout_s)["config"]
        served = _parameters(config).get(METADATA_PARAMETER)
        if served == self._served and not self.failures:
            return
        bundle, _ = bundle_from_config(config, self.url)
        if identity(bundle) != identity(self.bundle):
            msg = (
                f"inference server {self.url} serves another model {self.model!r} now "
                f"(classes {list(bundle.classes)}, input {bundle.input_size}, tiling {bundle.tiling}); "
                "restart this client to use it, or serve the previous bundle again"
            )
            raise BundleError(msg, Status.BUNDLE_INCOMPATIBLE)
        if served == self._served:
            return  # back after an outage with the model it had
        if bundle.thresholds != self.bundle.thresholds:
            log.warning(
                "inference server %s serves new thresholds for %s: %s (was %s); applied from this frame on",
                self.url,
                list(bundle.classes),
                list(bundle.thresholds),
                list(self.bundle.thresholds),
            )
        self.bundle, self._served = bundle, served

    def deactivate_impl(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


def _ready_models(client: Any) -> list[str] | None:
    """Names of the server's ready models, or None where its repository index is not open to clients
    (`hgad-edge serve` keeps the model-repository API to itself)."""
    try:
        index = client.get_model_repository_index(as_json=True, client_timeout=TIMEOUT_S).get("models", [])
    except _import_client().InferenceServerException:
        return None
    return sorted({m["name"] for m in index if m.get("state") == "READY"})


def _ready_model(client: Any, shown: str, address: str, model: str | None, timeout_s: float) -> str:
    """The first ready model of the URL's (or of MODEL_CANDIDATES); a server without it is an outage
    (still loading it, or it never will: the message says which models it does serve, where it can)."""
    names = (model,) if model else MODEL_CANDIDATES
    for name in names:
        try:
            if client.is_model_ready(name, client_timeout=timeout_s):
                return name
        except _import_client().InferenceServerException:  # unknown to this server
            continue
    ready = _ready_models(client)
    if ready:
        serves = f"it serves {ready}: name one in the URL, e.g. {SCHEME}{address}/{ready[0]}"
    else:
        serves = (
            f"`hgad-edge serve` serves 'hgad', which {SCHEME}{address} (no model in the URL) finds; a repository "
            "of `hgad-edge triton-repo` serves hgad_onnx_fp32 and the others it printed"
        )
    wanted = repr(model) if model else f"any of {list(MODEL_CANDIDATES)}"
    msg = f"the server at {shown} answers but has no ready model {wanted} (still loading it?); {serves}"
    raise ServerUnavailableError(msg, Status.BACKEND_UNAVAILABLE)


def connect(
    url: str,
    input_specs_of: Any,
    output_names: list[str],
    precision: str = "auto",
    max_batch: int = 8,
    timeout_s: float = TIMEOUT_S,
) -> tuple[Bundle, TritonRunner]:
    """Check the server and its model, then return (Bundle from the server, active runner).

    A server that is not there, or whose model is not ready, raises ServerUnavailableError (retry later)."""
    address, model = parse_url(url)
    shown = redact_url(url.strip())
    grpc = _import_client()
    client = _open_client(address, url_credentials(url))
    try:
        try:
            live = client.is_server_live(client_timeout=timeout_s)
        except grpc.InferenceServerException as err:
            live, reason = False, _reason(err)
        else:
            reason = "not live"
        if not live:
            msg = (
                f"no Triton server answers at {shown} ({reason}); "
                "start one with `hgad-edge serve BUNDLE` or check host and port"
            )
            raise ServerUnavailableError(msg, Status.BACKEND_UNAVAILABLE)
        name = _ready_model(client, shown, address, model, timeout_s)
        config = client.get_model_config(name, as_json=True, client_timeout=timeout_s)["config"]
    except grpc.InferenceServerException as err:  # the server went away between two calls
        client.close()
        if _transient(err):
            raise ServerUnavailableError(f"the server at {shown} stopped answering: {_reason(err)}") from err
        raise BundleError(f"the server at {shown} refused its model config: {_reason(err)}") from err
    except Exception:
        client.close()
        raise
    resolved = f"{SCHEME}{address}/{name}"  # what info()["bundle"] and messages show: the model used, no user info
    bundle, served = bundle_from_config(config, resolved)
    if precision not in ("auto", served):
        client.close()
        raise InvalidArgumentError(
            f"model {name!r} at {shown} runs {served}, precision={precision!r} was asked; "
            "pass precision='auto' or pick another model in the URL"
        )
    served_batch = int(config.get("max_batch_size", 0)) or 1
    runner = TritonRunner(
        resolved,
        name,
        bundle,
        config,
        input_specs_of(bundle),
        output_names,
        min(max_batch, served_batch),
        timeout_s,
        url_credentials(url),
    )
    runner.client, runner.precision = client, served
    return bundle, runner.activate()
