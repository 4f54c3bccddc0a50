"""hgad-edge: unified visual anomaly detection (HGAD) from training to the edge.

This package's top level imports nothing heavy: the torch-free runtime (`hgad_edge.runtime`) is
installed under the same name and must import on a machine without torch.
"""

__version__ = "0.1.0"
