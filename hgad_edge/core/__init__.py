"""The torch-free core: what the training side, the exporter and the runtime all need.

Bundle schema and loading, PASS/FAIL decisions (thresholds), imaging, atomic files, overlays,
redaction, metrics, status codes and errors, and the TensorRT / CUDA plumbing shared by the engine
builder and the engine runner. Nothing here imports torch or any other part of hgad_edge
(tests/test_architecture.py enforces it), so a line PC with only the base install can load it.
"""
