"""The SFT trainer on megatron-core (pretrain_sft.py is its thin entry point, through `launch`).

- `config`: the typed configuration tree, YAML + dotted overrides, validated;
- `preflight`: what a run reads and checks before any process group exists (the trainer's and the
  dry run's);
- `data`: packed rows -> THD micro-batches, the sample order; `batches`: each step's, prefetched;
- `train_module`: one rank's model, DDP, distributed optimizer, LR schedule, step and state;
- `trainer`: the loop; `callbacks`: the jobs around each step (metrics, the non-finite guard, the
  finished marker, the plot); `validator` and `checkpointer`: the two components it builds from the
  configuration (validation; resume and saves), callbacks too;
- `checkpointing`: the checkpoint format, atomic and asynchronous saves, loading;
- `metrics`, `plots`: console, JSONL, TensorBoard and wandb, and the curves; `watchdog`: hung steps;
- `dry_run/`: each rank's GPU memory, measured on fake tensors by the real train module.

The parallel layout and the planner are in `plan/`, the model in `models/`.
"""
