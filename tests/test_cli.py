"""Command-line surface: every flag of each tool is explained by --help, and the demo runs end to end."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tools_runner import load_tool

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "tool",
    [
        "get_am_dataset",
        "preprocess_sft",
        "convert_hf_to_mcore",
        "convert_mcore_to_hf",
        "verify_conversion",
        "pretrain_sft",
        "plan_layout",
        "plot_metrics",
        "evaluate",
    ],
)
def test_help_explains_every_flag(tool, capsys):
    parser = load_tool(tool).build_parser()
    for action in parser._actions:
        assert action.help and len(action.help.split()) >= 3, (
            f"{action.option_strings or action.dest} lacks help"
        )
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(opt in text for action in parser._actions for opt in action.option_strings)


def test_plot_metrics_draws_a_run_and_names_a_missing_one(tmp_path, capsys):
    import json

    run = tmp_path / "run"
    run.mkdir()
    lines = [
        {"iteration": i, "loss": 3.0 / i, "lr": 1e-4, "grad_norm": 1.0, "tokens_per_s": 1e3, "mfu": 0.4}
        | {"step_time_s": 1.0, "step_skipped": i == 2}
        for i in range(1, 5)
    ] + [{"iteration": 4, "val_loss": 1.0, "val_loss_tokens": 10, "val_packs": 1, "val_time_s": 0.1}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    tool = load_tool("plot_metrics")
    assert tool.main([str(run)]) == 0
    assert (run / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tool.main([str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


# pretrain_sft.py's main, then which of the heavy packages it imported
_MAIN_THEN_IMPORTS = """
import sys
import pretrain_sft
status = pretrain_sft.main(sys.argv[1:])
print("imported:", [name for name in ("torch", "megatron.core") if name in sys.modules])
sys.exit(status)
"""


@pytest.mark.slow  # a training run, a subprocess or a full pipeline: test-fast stays under 90 s
def test_trainer_rejects_a_bad_configuration_before_starting(tmp_path):
    """A missing file fails before torch and megatron-core are imported (every rank of a large job at
    once), with every problem found so far."""
    result = subprocess.run(
        [sys.executable, "-c", _MAIN_THEN_IMPORTS, "parallel.tensor=0", f"checkpoint.save_dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "data.prefixes is empty" in result.stderr and "parallel.tensor, pipeline" in result.stderr
    assert "imported: []" in result.stdout
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_missing_config_file_is_one_line_naming_it_and_the_shipped_ones(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "pretrain_sft.py"), "--config", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"{tmp_path / 'nope.yaml'}: no such config file" in result.stderr
    assert "configs/k2think_qwen2.5_32b.yaml" in result.stderr and "configs/tiny_cpu.yaml" in result.stderr


@pytest.mark.slow
def test_demo_runs_end_to_end_and_learns_the_answer_format(tmp_path):
    from formats.chat_template import AM_THINKING

    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "demo.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kept 600 rows, dropped 15" in result.stdout
    assert re.search(r"packs\s+\d+\s+x 512 tokens, efficiency", result.stdout)
    assert (tmp_path / "data" / "am_sample_meta.json").is_file()
    assert (tmp_path / "data" / "am_sample_valid_meta.json").is_file()
    assert (tmp_path / "run" / "finished.json").is_file() and (tmp_path / "release" / "config.json").is_file()
    assert "<|im_start|>assistant\n" in result.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    # Before training the model spreads its probability over the vocabulary (ln 151,936 = 11.9 nats).
    assert summary["train_iterations"] == 160 and summary["loss_first"] > 11
    assert summary["before_training"]["p_think_first_token"] < 1e-3
    assert not summary["before_training"]["reply"].startswith("<think>")
    # After: the loss has fallen far, on held-out conversations too, and replies open with <think>.
    assert summary["loss_last10_mean"] < summary["loss_first"] / 3
    val = [v["val_loss"] for v in summary["validation"]]
    assert [v["iteration"] for v in summary["validation"]] == [40, 80, 120, 160]
    assert val[-1] < val[0] and val[-1] < 4
    assert summary["after_training"]["p_think_first_token"] > 0.5
    assert summary["after_training"]["reply"].startswith("<think>")
    assert Path(summary["curves"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"loss curves: {summary['curves']}" in result.stdout
    # The evaluation stage on the release: 4 bundled problems x 2 samples, every prompt through the
    # release's chat template with the trained system prompt; the table printed (the score is a 2-layer
    # model's, near 0, and not asserted).
    score = json.loads((tmp_path / "eval" / "results.json").read_text())["scores"]["arithmetic"]
    assert (score["problems"], score["samples_per_problem"]) == (4, 2) and 0 <= score["pass_at_1"] <= 1
    assert summary["evaluation"]["pass_at_1"] == score["pass_at_1"]
    samples = [json.loads(line) for line in (tmp_path / "eval" / "samples" / "arithmetic.jsonl").open()]
    assert len(samples) == 8 and all(1 <= s["reply_tokens"] <= 48 for s in samples)
    assert samples[0]["prompt"].startswith(f"<|im_start|>system\n{AM_THINKING.default_system}<|im_end|>")
    assert "<|im_start|>user\nWhat is 17 + 25?<|im_end|>" in samples[0]["prompt"]
    assert re.search(r"^\| arithmetic \| \d+\.\d \|", result.stdout, re.M)
