"""Serving through Triton, all in one place: the model repository a bundle becomes (repository.py),
`hgad-edge serve` (server.py: the nvidia-pytriton wheel's tritonserver on a repository it writes, and
backend_model.py: the model its Python backend runs, the runtime behind model `hgad`) and the runtime's
client backend for `grpc://` bundles (client.py, tritonclient). Torch-free, like the rest of the runtime.
"""
