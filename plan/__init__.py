"""Choosing a parallel layout, before any GPU is booked: what a layout is and when it is valid
(`layout`: tensor x pipeline (x virtual stages) x context x data, one type for the trainer's
configuration and the planner alike), and what each valid layout costs per GPU in memory and step time
(`planner`: a documented analytic model; tools/plan_layout.py prints its table).

The measured counterpart, the dry run (sft/dry_run/, `pretrain_sft.py --dry-run`), builds the trainer's
own train module on fake tensors, so it stays in sft/ and compares itself with the planner from there.
Depends on `models/` and `common/` only; see docs/architecture.md.
"""
