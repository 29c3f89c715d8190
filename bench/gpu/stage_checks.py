"""The correctness stages on the device: training against the CPU (train_vs_cpu; moe_vs_cpu for a
mixture of experts), the packed and the context-parallel attention kernels against fp32 references
(attention), the conversion check (verify), and an exact resume (resume)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from harness import ROOT, pretrain, relative, tiny_inputs
from sizing import Sizes

BF16_LOSS_RTOL = 0.02  # bf16 weights/activations vs fp32 after 3 steps of a tiny model

ATTENTION_RTOL = 0.02  # bf16 packed attention vs fp32, relative to the largest reference value

RESUME_RTOL = 1e-3  # a resumed GPU run vs the uninterrupted one (cuBLAS/atomics non-determinism)

CHECKS = ("train_vs_cpu", "moe_vs_cpu", "attention", "verify", "resume")  # the summary's pass/fail stages


def _tiny_run(iterations: int, *overrides: str) -> list[str]:
    """The tiny model's run of `iterations` steps of 2 packs (no save between them unless overridden)."""
    return [
        "schedule.global_batch_size=2",
        f"schedule.train_iters={iterations}",
        "optimizer.lr=1e-3",
        "checkpoint.save_interval=100",
        *overrides,
    ]


def stage_train_vs_cpu(args, sizes: Sizes, work: Path) -> tuple[bool, dict]:
    return _device_bf16_vs_cpu_fp32(args, tiny_inputs(work), work, "steps")


def stage_moe_vs_cpu(args, sizes: Sizes, work: Path) -> tuple[bool, dict]:
    """The same for a tiny Qwen3 MoE: its router (fp32), token dispatcher and experts on the device
    (megatron-core's one module per expert without TE, TE's grouped GEMM with it)."""
    return _device_bf16_vs_cpu_fp32(args, tiny_inputs(work, family="qwen3_moe"), work, "moe-steps")


def _device_bf16_vs_cpu_fp32(args, inputs, work: Path, name: str) -> tuple[bool, dict]:
    common = _tiny_run(3, "schedule.warmup_ratio=0", "checkpoint.save_at_end=false")
    # bf16 on the device (as training runs there), fp32 on the CPU: the reference. In the CPU rehearsal
    # the "device" is the CPU too, still in bf16, so that the same comparison is rehearsed.
    device = pretrain(
        inputs.overrides(work / f"{name}-device", *common, f"device={args.device}", "model.precision=bf16")
    )
    cpu = pretrain(
        inputs.overrides(work / f"{name}-cpu", *common, "device=cpu", "model.precision=fp32"), cpu_only=True
    )
    diff = relative(device, cpu)
    return diff <= BF16_LOSS_RTOL, {
        "compared": f"bf16 on {args.device} against fp32 on the CPU",
        "device_bf16_losses": device,
        "cpu_fp32_losses": cpu,
        "max_rel_diff": diff,
        "tolerance": BF16_LOSS_RTOL,
    }


def stage_attention(args, sizes: Sizes, work: Path) -> tuple[bool, dict]:
    from models.packed_attention import packed_attention_kernel, packed_causal_attention

    torch.manual_seed(0)
    lengths = [700, 3000, 1, 29, 4000] if not args.tiny else [70, 300, 1, 29, 40]
    heads, groups, dim = 40, 8, 128
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    q = torch.randn(sum(lengths), heads, dim)
    k, v = torch.randn(sum(lengths), groups, dim), torch.randn(sum(lengths), groups, dim)
    reference = torch.empty_like(q)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):  # fp32, one conversation at a time
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        reference[start:end] = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, scale=dim**-0.5, enable_gqa=True
        ).transpose(0, 1)
    ours = (
        packed_causal_attention(
            *(t.to(args.device, torch.bfloat16) for t in (q, k, v)),
            cu.to(args.device),
            max(lengths),
            dim**-0.5,
        )
        .float()
        .cpu()
    )
    error = float((ours - reference).abs().max() / reference.abs().max())
    context_parallel = context_parallel_chunks_error(lengths, heads, groups, dim, args.device)
    passed = error <= ATTENTION_RTOL and context_parallel["max_rel_error_bf16"] <= ATTENTION_RTOL
    return passed, {
        "kernel": packed_attention_kernel(args.device),
        "max_rel_error_bf16": error,
        "tolerance": ATTENTION_RTOL,
        "unrepeated_gqa": unrepeated_gqa(q, k, v, cu, max(lengths), dim**-0.5, args.device),
        "context_parallel": context_parallel,
    }


def context_parallel_chunks_error(lengths: list[int], heads: int, groups: int, dim: int, device: str) -> dict:
    """The context-parallel attention's kernel on one device: each CP rank's query chunks (CP4, the
    conversations padded to multiples of 8) against the whole row's keys and values, in bf16, against
    the fp32 per-conversation attention on the CPU at the same positions (the all-gather around it is
    proven on CPU by tests/test_sft_data.py)."""
    from formats.packed import padded_lengths
    from models.packed_attention import (
        ContextParallelChunks,
        attend_query_chunks,
        packed_attention_kernel,
        packed_causal_attention,
    )
    from sft.data import context_parallel_indices

    cp = 4
    padded = padded_lengths(lengths, 2 * cp)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(padded)]), dtype=torch.int32)
    torch.manual_seed(1)
    q = torch.randn(int(cu[-1]), heads, dim)
    k, v = torch.randn(int(cu[-1]), groups, dim), torch.randn(int(cu[-1]), groups, dim)
    reference = packed_causal_attention(q, k, v, cu, int(padded.max()), dim**-0.5)
    error = 0.0
    for rank in range(cp):
        index = torch.from_numpy(context_parallel_indices(cu.numpy(), cp, rank))
        chunks = ContextParallelChunks.build(cu, cp, rank)
        ours = attend_query_chunks(
            q.index_select(0, index).to(device, torch.bfloat16),
            *(t.to(device, torch.bfloat16) for t in (k, v)),
            chunks,
            dim**-0.5,
        )
        expected = reference.index_select(0, index)
        error = max(error, float((ours.float().cpu() - expected).abs().max() / expected.abs().max()))
    return {
        "kernel": packed_attention_kernel(device, cp),
        "context_parallel": cp,
        "max_rel_error_bf16": error,
    }


def unrepeated_gqa(q, k, v, cu, max_seqlen: int, scale: float, device: str) -> dict:
    """Where torch's varlen attention takes no `enable_gqa` (torch 2.11), the trainer repeats K/V to the
    query heads. Whether its flash kernel takes the fewer K/V heads as they are, forward and backward,
    with the same result (a saving to measure next), recorded and never failing the stage."""
    from models.packed_attention import _varlen_attention

    varlen = _varlen_attention() if device == "cuda" else None
    if varlen is None or varlen[2]:
        return {"checked": False, "why": "no varlen attention here" if varlen is None else "takes enable_gqa"}
    varlen_attn, repeat = varlen[0], q.shape[1] // k.shape[1]
    try:
        inputs = [t.to(device, torch.bfloat16).requires_grad_() for t in (q, k, v)]
        repeated = [inputs[0], *(t.repeat_interleave(repeat, dim=1) for t in inputs[1:])]
        cu32 = cu.to(device, torch.int32)
        results = []
        for query, key, value in (inputs, repeated):
            out = varlen_attn(
                query, key, value, cu32, cu32, max_seqlen, max_seqlen, scale=scale, window_size=(-1, 0)
            )
            grads = torch.autograd.grad(out.float().square().sum(), inputs)
            results.append((out.detach().float(), *(g.float() for g in grads)))
        errors = [float((a - b).abs().max() / b.abs().max()) for a, b in zip(*results, strict=True)]
        return {"checked": True, "max_rel_error_out_dq_dk_dv": errors}
    except Exception as exc:  # the answer is the point: a kernel that refuses it says so here
        return {"checked": True, "error": f"{type(exc).__name__}: {exc}"[:500]}


def stage_verify(args, sizes: Sizes, work: Path) -> tuple[bool, dict]:
    inputs = tiny_inputs(work)
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "verify_conversion.py"),
        "--hf",
        str(inputs.hf),
        "--mcore",
        str(inputs.mcore),
        "--device",
        args.device,
        "--atol",
        "1e-3",
        "--seq-length",
        "128",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    sys.stderr.write(done.stderr[-4000:])
    return done.returncode == 0, {
        "output": done.stdout.strip().splitlines()[-1:],
        "exit_status": done.returncode,
    }


def stage_resume(args, sizes: Sizes, work: Path) -> tuple[bool, dict]:
    import shutil

    inputs = tiny_inputs(work)
    common = _tiny_run(
        4, "checkpoint.save_interval=2", "checkpoint.keep_last_n=null", f"device={args.device}"
    )
    whole = pretrain(inputs.overrides(work / "resume-whole", *common))
    (work / "resume-again").mkdir()
    shutil.copytree(work / "resume-whole" / "iter_0000002", work / "resume-again" / "iter_0000002")
    resumed = pretrain(inputs.overrides(work / "resume-again", *common))  # resume=auto: from iteration 2
    diff = relative(resumed, whole[2:])
    return len(resumed) == 2 and diff <= RESUME_RTOL, {
        "uninterrupted": whole,
        "resumed_3_4": resumed,
        "max_rel_diff": diff,
        "tolerance": RESUME_RTOL,
    }
