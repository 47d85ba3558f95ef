"""Loaded at start-up by every Python process of the contract environment (its folder is on PYTHONPATH).

The torchvision wheel on PyPI is a CUDA build whose compiled operators cannot load into CPU torch, and
importing torchvision registers fake kernels for two of them. Declaring their schemas lets it import; vLLM's
image processor needs only its Python transforms. vLLM imports torchvision in processes it starts itself
(model inspection), hence here rather than in a test.
"""

import torch

_torchvision_ops = torch.library.Library("torchvision", "DEF")
for _op in ("nms", "qnms"):
    _torchvision_ops.define(f"{_op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
