"""Int8 weights for fast CPU inference: a module swap of `nn.Linear` for fbgemm's dynamic int8 linear.

At batch 1 a small model's decode reads every weight once per token, so it is bound by memory traffic: int8
weights (per output channel) move a quarter of the bytes of float32. fbgemm also quantizes each activation row
on the fly and accumulates in int32, which on this class of CPU was ~9x faster than a float32 linear for the
vocabulary projection; the int8/int4 "weight pack" kernels of torch were slower than float32 (see DESIGN.md).
The model's float weights are not kept: quantize a model loaded for inference, not one being trained.
"""

import torch
from torch import Tensor, nn

from camelid.errors import CamelidError

QUANTIZATIONS = ("int8",)


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 per output channel, computed by fbgemm's dynamic int8 kernel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float().cpu()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        qweight = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float().cpu()
        self._packed = torch.ops.quantized.linear_prepack(qweight, bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]).float().contiguous(), self._packed, True)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_model(model: nn.Module, kind: str = "int8") -> nn.Module:
    """Replace every linear layer (the output head included) by its int8 version, in place."""
    if kind not in QUANTIZATIONS:
        raise CamelidError(f"unknown quantization {kind!r}; choose one of: {', '.join(QUANTIZATIONS)}")
    if next(model.parameters()).device.type != "cpu":
        raise CamelidError("int8 quantization runs on the CPU only; on a GPU use --dtype bfloat16")
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise CamelidError("this torch build has no fbgemm int8 kernels; run without --quantize")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
    return model
