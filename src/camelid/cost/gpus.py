"""The GPUs `camelid cost` knows: peak dense tensor FLOP/s and memory, each row with the page it comes from.

Peaks are without structured sparsity (datasheets that quote only the sparse figure are halved), in bf16 where the
chip has it and fp16 where it does not.
"""

import re
from dataclasses import dataclass

from camelid.errors import CamelidError


@dataclass(frozen=True)
class GPU:
    name: str
    tflops: float  # peak dense (no sparsity) bf16 tensor TFLOP/s, or fp16 where the chip has no bf16
    memory_gb: float
    source: str  # where the two numbers are published
    bf16: bool = True
    note: str = ""


A100_DATASHEET = ("NVIDIA A100 Tensor Core GPU datasheet: BF16 312 TFLOPS dense (624 with sparsity), "
                  "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
                  "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf")
H100_DATASHEET = ("NVIDIA H100 Tensor Core GPU datasheet, "
                  "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet")

GPUS = {
    g.name: g
    for g in [
        GPU("A100-40GB", 312.0, 40, A100_DATASHEET),
        GPU("A100-80GB", 312.0, 80, A100_DATASHEET),
        GPU("H100-SXM", 989.5, 80, f"{H100_DATASHEET}: BF16 1,979 TFLOPS with sparsity, halved"),
        GPU("H100-PCIe", 756.5, 80, f"{H100_DATASHEET}: BF16 1,513 TFLOPS with sparsity, halved"),
        GPU("H200", 989.5, 141, "NVIDIA H200 datasheet (H200 SXM): BF16 1,979 TFLOPS with sparsity, halved; 141 GB "
            "HBM3e, https://www.nvidia.com/en-us/data-center/h200/"),
        GPU("L40S", 362.05, 48, "NVIDIA L40S datasheet: BF16 362.05 TFLOPS dense (733 with sparsity), 48 GB GDDR6, "
            "https://www.nvidia.com/en-us/data-center/l40s/"),
        GPU("A10G", 70.0, 24, "Baseten, 'NVIDIA A10 vs A10G for ML model inference' (spec table), "
            "https://www.baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-inference/",
            note="AWS's variant of the A10 (G5 instances); NVIDIA publishes no A10G datasheet, so this figure is "
            "third-party (the A10's own datasheet gives 125)"),
        GPU("RTX-4090", 165.2, 24, "NVIDIA Ada GPU Architecture whitepaper, GeForce RTX 4090: BF16 tensor with FP32 "
            "accumulate 165.2 TFLOPS dense, https://images.nvidia.com/aem-dam/Solutions/geforce/ada/"
            "nvidia-ada-gpu-architecture.pdf",
            note="GeForce cards run FP32-accumulate tensor math at half their FP16-accumulate rate (330.3)"),
        GPU("RTX-3090", 71.0, 24, "NVIDIA Ampere GA102 GPU Architecture whitepaper, GeForce RTX 3090: BF16 tensor "
            "with FP32 accumulate 71 TFLOPS dense, https://www.nvidia.com/content/PDF/"
            "nvidia-ampere-ga-102-gpu-architecture-whitepaper-v2.pdf",
            note="as the RTX 4090: half rate with FP32 accumulate (142 with FP16 accumulate)"),
        GPU("V100", 125.0, 32, "NVIDIA V100 Tensor Core GPU datasheet (V100 SXM2): 125 TFLOPS tensor (FP16), 32 GB "
            "HBM2, https://images.nvidia.com/content/technologies/volta/pdf/"
            "volta-v100-datasheet-update-us-1165301-r5.pdf",
            bf16=False, note="no bf16: fp16 mixed precision only (a 16 GB model exists; the PCIe card is 112)"),
        GPU("T4", 65.0, 16, "NVIDIA T4 Tensor Core GPU datasheet: mixed precision (FP16/FP32) 65 TFLOPS, 16 GB "
            "GDDR6, https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/tesla-t4/"
            "t4-tensor-core-datasheet-951643.pdf",
            bf16=False, note="no bf16: fp16 mixed precision only"),
    ]
}


def find_gpu(name: str) -> GPU:
    """A GPU of the table by name (case, spaces and underscores do not matter), or a one-line error listing them."""
    key = re.sub(r"[\s_]+", "-", name.strip()).lower()
    for gpu in GPUS.values():
        if gpu.name.lower() == key:
            return gpu
    raise CamelidError(f"unknown GPU {name!r}; choose one of: {', '.join(GPUS)} (see: camelid cost --list-gpus)")


def gpu_table() -> str:
    """The GPU table as Markdown, each row with its source."""
    lines = ["| GPU | peak dense bf16 TFLOP/s | memory GB | source |", "|:--|--:|--:|:--|"]
    for g in GPUS.values():
        peak = f"{g.tflops:g}" + ("" if g.bf16 else " (fp16)")
        lines.append(f"| {g.name} | {peak} | {g.memory_gb:g} | {g.source} |")
    notes = [f"- {g.name}: {g.note}" for g in GPUS.values() if g.note]
    sparsity = "Tensor-core peaks without structured sparsity (datasheets quote twice these with it)."
    return "\n".join([*lines, "", sparsity, *notes])
