"""What every command stands on: device and memory, time budgets, torch.distributed, output folders, progress, run records."""
