"""The SFT trainer on megatron-core (pretrain_sft.py is its thin entry point): the typed configuration
(`config`), packed rows into micro-batches (`data`), one rank's model, optimizer and step
(`train_module`), the loop and loss normalisation (`trainer`), the jobs around each step
(`callbacks`), checkpoints (`checkpointing`), metrics and curves (`metrics`, `plots`), the hung-step
watchdog (`watchdog`), the failure-requeue policy (`requeue`), the layout planner (`planner`) and the
dry run of each rank's memory (`dry_run`). The model itself is in `models/`."""
