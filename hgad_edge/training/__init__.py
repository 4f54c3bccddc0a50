"""The PyTorch side: data, backbone, flows, mixture head, scoring, training and evaluation.

Every module here may import torch (the `train` extra); the runtime and the core never import this
package (tests/test_architecture.py enforces it). Data flows data -> backbone -> flows -> head ->
scoring; train.py and evaluate.py drive it.
"""
