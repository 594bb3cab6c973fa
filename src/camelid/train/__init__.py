"""Fine-tuning: examples, LoRA, the training loop, recipes."""
