"""Serving through Triton, all in one place: the model repository a bundle becomes (repository.py),
the embedded server behind `hgad-edge serve` (server.py, PyTriton) and the runtime's client backend
for `grpc://` / `http://` bundles (client.py, tritonclient). Torch-free, like the rest of the runtime.
"""
