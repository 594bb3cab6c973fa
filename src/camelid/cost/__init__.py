"""What a training recipe costs: tokens, FLOPs, hours and dollars on a given GPU (`camelid cost`).

    gpus.py      the GPU table: peak dense tensor FLOP/s and memory, each with its source
    tokens.py    D and S: the token positions a run puts through the model, counted as `camelid train` batches them
    flops.py     N and N_lora from a model's shapes, and the FLOP formulas
    estimate.py  time, dollars and memory from those, the warnings and assumptions, and the table and JSON

Time = FLOPs / (GPUs x peak dense bf16 tensor FLOP/s x utilisation); evaluation runs on every process at once,
so its FLOPs are divided by one GPU's rate. Dollars = hours x GPUs x price per GPU-hour.

Utilisation. The share of peak that the FLOPs reach over a whole run. With gradient checkpointing the
recomputed forward is counted as work, so strictly it is hardware FLOPs utilisation; without checkpointing it
is model FLOPs utilisation (MFU). The default, 0.20, stands for the stack the published 2023 recipes ran on —
the Hugging Face Trainer with PyTorch FSDP, padded rows, eager or early flash attention — and is read off
published figures, not fitted to the Alpaca and Vicuna timings:
  - tuned Megatron-LM reached 41.5% MFU (22B) to 56% (1T) on A100-80GB (Korthikanti et al. 2022,
    arXiv:2205.05198), the ceiling for that generation;
  - the FlashAttention paper trained GPT-2 on 8 A100s with Hugging Face's implementation 2.0x (small) and 1.8x
    (medium) slower than with Megatron-LM's (Dao et al. 2022, arXiv:2205.14135, Table 2): about 41.5% / 2 ≈ 21%;
  - PaLM's comparison puts GPT-3's own training at 21.3% MFU (Chowdhery et al. 2022, arXiv:2204.02311, Table 3).
Tuned FSDP stacks of 2024 (FlashAttention-2, torch.compile, packed rows) report 50-57%; pass --utilization 0.5
to estimate a run like that.

Memory. Full fine-tuning keeps float32 weights, float32 gradients and Adam's two float32 moments: 16 bytes a
parameter; LoRA keeps the frozen base in bf16 (2 bytes) and 16 bytes per adapter weight. FSDP shards them over
the GPUs; DDP keeps a whole copy on each. Activations come on top and are not estimated.
"""

from camelid.cost.estimate import DEFAULT_UTILIZATION, CostEstimate, cost_json, cost_table, estimate_cost, parse_count
from camelid.cost.flops import count_parameters, lora_parameters
from camelid.cost.gpus import GPUS, find_gpu, gpu_table

__all__ = ["DEFAULT_UTILIZATION", "GPUS", "CostEstimate", "cost_json", "cost_table", "count_parameters",
           "estimate_cost", "find_gpu", "gpu_table", "lora_parameters", "parse_count"]
