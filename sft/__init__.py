"""The SFT trainer on megatron-core (pretrain_sft.py is its thin entry point): the typed configuration
(`config`), packed rows into micro-batches (`data`), the loop, step and loss (`trainer`), checkpoints
(`checkpointing`), metrics and curves (`metrics`, `plots`), the hung-step watchdog (`watchdog`), the
failure-requeue policy (`requeue`) and the layout planner (`planner`). The model itself is in `models/`."""
