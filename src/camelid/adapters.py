"""Many LoRA adapters on one copy of a base model, chosen per batch row (`camelid serve --adapter`).

`camelid.lora` merges one adapter into its base, so a server answering for k adapters that way would hold k models.
Here each targeted linear layer becomes a `MultiLoRALinear`: the base layer, plus each adapter's A [r, in] and
B [out, r] kept apart. Adapters may differ in rank, alpha and target modules: each keeps its own matrices and
scale, and a layer an adapter does not target has no entry for it (no padding to a common rank).

Adapter 0 is the base itself. Which adapter each batch row uses is said for one forward pass at a time, with
`adapter_rows(model, ids)`; within the block every layer adds scaling_k * (x A_k^T) B_k^T to the rows of adapter k,
outside it every layer is its base alone. Rows are grouped by adapter once per pass and each layer runs one pair of
small products per adapter present, rather than gathering per-row matrices: for the few adapters a server holds
that is fewer, larger products, and rows of the base cost nothing beyond the base.

Unmerged, a row computes W x + s B (A x) where the merged model computes (W + s B A) x: equal up to float rounding
(tests/serve/test_adapters.py checks that greedy answers are the same as `camelid generate -m ADAPTER`'s).
"""

import contextlib

import torch
from torch import Tensor, nn

from camelid.errors import CamelidError
from camelid.lora import TARGET_PARENTS, read_adapter
from camelid.model import Llama


class MultiLoRALinear(nn.Module):
    """A frozen linear layer and any number of LoRA adapters on it, each applied to the rows that chose it."""

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ParameterDict()  # adapter index (as a string: ParameterDict's keys are) -> A [r, in]
        self.lora_B = nn.ParameterDict()  # -> B [out, r]
        self.scaling: dict[int, float] = {}
        self.groups: list[tuple[int, Tensor | None]] = []  # set by adapter_rows: (adapter, its rows; None: all)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def add(self, index: int, a: Tensor, b: Tensor, scaling: float) -> None:
        """Hold adapter `index`'s A and B, in the base weight's dtype and device."""
        w = self.base_layer.weight
        self.lora_A[str(index)] = nn.Parameter(a.to(w.device, w.dtype), requires_grad=False)
        self.lora_B[str(index)] = nn.Parameter(b.to(w.device, w.dtype), requires_grad=False)
        self.scaling[index] = scaling

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        for index, rows in self.groups:
            if index not in self.scaling:  # this adapter leaves this layer as the base's
                continue
            a, b = self.lora_A[str(index)], self.lora_B[str(index)]
            if rows is None:
                out.add_((x @ a.T) @ b.T * self.scaling[index])
            else:
                out.index_add_(0, rows, (x[rows] @ a.T) @ b.T * self.scaling[index])
        return out


def add_adapter(model: Llama, directory, index: int) -> None:
    """Give `model` the adapter saved in `directory` (by camelid or peft) as adapter `index` (1, 2, ...), in place,
    beside those it has; the base weights are shared, not copied. A one-line refusal if it does not fit the model."""
    if model.quantization != "none":
        raise CamelidError(f"adapters per request need a float base, not one quantized to {model.quantization}; "
                           "leave out --quantize")
    if index < 1:
        raise CamelidError(f"adapter index {index} is not at least 1 (0 is the base)")
    config, weights = read_adapter(model, directory)
    for i, layer in enumerate(model.model.layers):
        for name in config.targets:
            parent = getattr(layer, TARGET_PARENTS[name])
            if type(getattr(parent, name)) is nn.Linear:
                setattr(parent, name, MultiLoRALinear(getattr(parent, name)))
            prefix = f"model.layers.{i}.{TARGET_PARENTS[name]}.{name}"
            getattr(parent, name).add(index, weights[f"{prefix}.lora_A.weight"], weights[f"{prefix}.lora_B.weight"],
                                      config.alpha_of(name) / config.rank(name))


@contextlib.contextmanager
def adapter_rows(model: nn.Module, ids: list[int]):
    """Within the block, row b of every forward pass of `model` uses adapter ids[b] (0: the base alone).

    Set for one pass by whoever runs it (camelid.engine), and cleared after, so a layer never keeps a batch's
    choice for the next: outside the block the model computes its base."""
    layers = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    groups = _groups(ids, model.model.embed_tokens.weight.device) if layers else []
    for layer in layers:
        layer.groups = groups
    try:
        yield model
    finally:
        for layer in layers:
            layer.groups = []


def _groups(ids: list[int], device) -> list[tuple[int, Tensor | None]]:
    """(adapter, the rows using it) for each adapter in `ids` but the base; None when every row uses it."""
    groups = []
    for index in sorted(set(ids) - {0}):
        rows = [b for b, k in enumerate(ids) if k == index]
        groups.append((index, None if len(rows) == len(ids) else torch.tensor(rows, device=device)))
    return groups
