"""`mla-plugin plan`: its figures for a tiny config equal counts done by hand (written out below),
the sharded latent's rows agree with the plugin's own ShardingPlan and kv_b_proj loader shape,
modes that cannot run at a TP size say why, bad input is one line with exit code 2, the Markdown
output parses, and the tables in docs/choosing_a_mode.md and the README are the command's
current output."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mla_plugin import plan
from mla_plugin.cli import main
from mla_plugin.gla_options import ShardedLatentOptions
from mla_plugin.sharded_weights import rank_up_projection_shape
from tests.paths import REPO

GIB = 1073741824
# d_model 64, 3 layers, H 4, d_c 32, d_R 8, d_nope 16, d_v 16, full-rank q_proj
TINY = {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "kv_lora_rank": 32,
        "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16, "q_lora_rank": None}
STEP = plan.Step(batch=5, context=7)
DOC = REPO / "docs/choosing_a_mode.md"
README = REPO / "README.md"


def _write(tmp_path: Path, config, name="config.json") -> Path:
    path = tmp_path / name
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    return path


def _shape(config=TINY) -> plan.AttentionShape:
    return plan.shape_from_config(dict(config), "tiny", Path("tiny.json"))


def _rows(config=TINY, tp=2, step=STEP) -> dict[str, plan.ModeRow]:
    shape = _shape(config)
    return {row.mode: row for row in plan.plan_rows(shape, tp, step)}


def _bytes(row: plan.ModeRow) -> dict[str, int]:
    return {c.name: c.bytes for c in row.collectives}


def test_tiny_config_at_tp2_equals_hand_counts():
    rows = _rows()
    # MLA TP: 2 heads per rank. q_proj 2*(16+8)*64 = 3072, kv_a (32+8)*64 = 2560,
    # kv_b 2*(16+16)*32 = 2048, o_proj 64*2*16 = 2048: 9728 per layer, 3 layers.
    mla = rows["MLA TP"]
    assert (mla.values_per_token, mla.weights_per_rank, mla.exact) == (40, 29184, True)
    assert _bytes(mla) == {"all-reduce of o_proj's output": 640}  # B*d_model*2 = 5*64*2
    assert mla.tokens_per_gib(_shape(), 2) == GIB // (40 * 2 * 3) == 4473924
    # DCP 2: MLA TP's weights; 40 values of each token on one of 2 ranks: 20 per rank.
    dcp = rows["DCP 2"]
    assert (dcp.values_per_token, dcp.weights_per_rank, dcp.exact) == (20, 29184, True)
    assert _bytes(dcp) == {
        "all-gather of the absorbed queries": 1600,  # B*H*(d_c+d_R)*2 = 5*4*40*2
        "all-gather of the log-sum-exps": 160,  # N*B*H*4 = 2*5*4*4
        "reduce-scatter of the latent outputs": 1280,  # B*H*d_c*2 = 5*4*32*2
        "all-reduce of o_proj's output": 640,
    }
    assert dcp.collective_bytes == 3680
    # DP-attention: all 4 heads per rank. q_proj 4*24*64 = 6144, kv_a 2560, kv_b 4*32*32 = 4096,
    # o_proj 64*4*16 = 4096: 16896 per layer.
    dp = rows["DP-attention"]
    assert (dp.values_per_token, dp.weights_per_rank, dp.exact) == (20, 50688, True)
    assert _bytes(dp) == {"gather of hidden states for the MLP": 640}
    # exact: all heads; kv_b only the rank's 16 latent columns: 4*32*16 = 2048.
    # 6144 + 2560 + 2048 + 4096 = 14848 per layer; caches 32/2 + 8 = 24 values.
    exact = rows["sharded exact"]
    assert (exact.values_per_token, exact.weights_per_rank, exact.exact) == (24, 44544, True)
    assert _bytes(exact) == {"all-reduce of the partial latent logits": 560,  # B*H*C*4 = 5*4*7*4
                             "all-reduce of o_proj's output": 640}
    partitioned = rows["sharded partitioned"]
    assert (partitioned.values_per_token, partitioned.weights_per_rank, partitioned.exact) == (24, 44544, False)
    assert _bytes(partitioned) == {"all-reduce of o_proj's output": 640}
    # grouped: 2 heads and 16 columns. q_proj 2*24*64 = 3072, kv_a 2560, kv_b 2*32*16 = 1024,
    # o_proj 64*2*16 = 2048: 8704 per layer.
    grouped = rows["sharded grouped"]
    assert (grouped.values_per_token, grouped.weights_per_rank, grouped.exact) == (24, 26112, False)
    assert _bytes(grouped) == {"all-reduce of o_proj's output": 640}


def test_low_rank_query_counts_q_a_proj_whole_on_every_rank():
    rows = _rows({**TINY, "q_lora_rank": 24})
    # MLA TP: q_a_proj 24*64 = 1536 (whole) + q_b_proj 2*24*24 = 1152; kv_a 2560, kv_b 2048, o 2048.
    assert rows["MLA TP"].weights_per_rank == 3 * (1536 + 1152 + 2560 + 2048 + 2048)
    # grouped: q_b_proj by heads too, q_a_proj whole; kv_b 1024.
    assert rows["sharded grouped"].weights_per_rank == 3 * (1536 + 1152 + 2560 + 1024 + 2048)


@pytest.mark.parametrize("softmax", ["exact", "partitioned", "grouped"])
def test_sharded_rows_agree_with_the_plugins_plan(softmax):
    """The cache width, heads and kv_b_proj block of the plugin's own ShardingPlan / loader at TP 2:
    grouped loads only its d_loc columns; exact and partitioned load all d_c and keep d_loc after
    the fold (sharded_weights.fold_rank_up_projection), which is what plan counts."""
    shape = _shape()
    sharding = ShardedLatentOptions(softmax=softmax).resolve(latent_dim=32, num_heads=4, tp_size=2)
    rows, loaded_cols = rank_up_projection_shape(sharding, nope_dim=16, v_dim=16)
    assert loaded_cols == (sharding.local_latent_dim if softmax == "grouped" else 32)
    row = _rows()[f"sharded {softmax}"]
    assert row.values_per_token == sharding.local_latent_dim + 8
    heads = sharding.local_heads
    kept = rows * sharding.local_latent_dim
    per_layer = shape.query_weights(heads) + shape.kv_a_weights() + kept + shape.o_weights(heads)
    assert row.weights_per_rank == 3 * per_layer


def test_one_rank_has_no_collectives():
    rows = _rows(tp=1)
    assert all(row.collectives == () for row in rows.values())
    assert {row.values_per_token for row in rows.values()} == {40}


def test_cache_dtype_and_context_scale_what_they_should():
    shape = _shape()
    rows = _rows()
    assert rows["MLA TP"].tokens_per_gib(shape, 1) == GIB // (40 * 3)  # fp8: one byte per value
    longer = _rows(step=plan.Step(batch=5, context=70))
    assert _bytes(longer["sharded exact"])["all-reduce of the partial latent logits"] == 5600
    assert longer["DCP 2"].collectives == rows["DCP 2"].collectives  # DCP's traffic ignores C


def test_modes_that_cannot_run_say_why():
    rows = _rows({**TINY, "num_attention_heads": 6}, tp=4)  # d_c 32 splits in 4, 6 heads do not
    for mode in ("MLA TP", "DCP 4", "sharded grouped"):
        assert rows[mode].impossible == "the 6 heads are not divisible by TP 4", mode
    for mode in ("DP-attention", "sharded exact", "sharded partitioned"):
        assert rows[mode].impossible is None and rows[mode].weights_per_rank > 0, mode
    rows = _rows(tp=3)
    assert rows["sharded exact"].impossible == "kv_lora_rank 32 is not divisible by g = TP 3"


def test_impossible_rows_print_and_the_command_succeeds(tmp_path, capsys):
    config = _write(tmp_path, TINY)
    assert main(["plan", str(config), "--tp", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("not possible: ") == 5
    assert re.search(r"^DP-attention +13\.3 ", out, re.M), out  # 40 values / 3 ranks


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def test_bad_inputs_are_one_line_and_exit_2(tmp_path, capsys):
    assert "no such config" in _error(capsys, ["plan", str(tmp_path / "missing"), "--tp", "2"])
    assert "no such config" in _error(capsys, ["plan", str(tmp_path), "--tp", "2"])  # a folder without config.json
    llama = _write(tmp_path, {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2})
    assert "not an MLA config (no kv_lora_rank)" in _error(capsys, ["plan", str(llama), "--tp", "2"])
    assert "as JSON" in _error(capsys, ["plan", str(_write(tmp_path, "{oops", "bad.json")), "--tp", "2"])
    assert "JSON object" in _error(capsys, ["plan", str(_write(tmp_path, "[1]", "list.json")), "--tp", "2"])
    broken = _write(tmp_path, {**TINY, "v_head_dim": 0}, "zero.json")
    assert "v_head_dim must be a positive integer" in _error(capsys, ["plan", str(broken), "--tp", "2"])
    missing = _write(tmp_path, {k: v for k, v in TINY.items() if k != "qk_nope_head_dim"}, "nope.json")
    assert "no qk_nope_head_dim" in _error(capsys, ["plan", str(missing), "--tp", "2"])
    good = str(_write(tmp_path, TINY, "good.json"))
    for flag in ("--tp", "--batch", "--context"):
        argv = ["plan", good, "--tp", "2", flag, "0"]
        assert _error(capsys, argv) == f"error: {flag} must be a positive integer, got 0"


def test_console_script_exits_2_with_one_line(tmp_path):
    script = Path(sys.executable).parent / "mla-plugin"
    proc = subprocess.run([str(script), "plan", str(tmp_path / "nothing"), "--tp", "8"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_help_shows_defaults_and_an_example(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["plan", "--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(required)", "(default: 64)", "(default: 8192)", "(default: bf16)", "(default: text)"):
        assert shown in text, shown
    assert "example: mla-plugin plan docs/plan_configs/deepseek-v3.json --tp 8" in text


def _markdown_tables(text: str) -> list[list[list[str]]]:
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            assert line.endswith(" |"), line
            current.append([cell.strip() for cell in line[1:-1].split(" | ")])
        elif current:
            tables.append(current)
            current = []
    return tables


def _size(text: str) -> float:
    number, unit = text.split()
    return float(number) * {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[unit]


def test_markdown_output_parses_back_to_the_figures(tmp_path, capsys):
    config = _write(tmp_path, TINY)
    assert main(["plan", str(config), "--tp", "2", "--batch", "5", "--context", "7", "--format", "markdown"]) == 0
    summary, collectives = _markdown_tables(capsys.readouterr().out)
    assert summary[1] == ["---"] * 6 and collectives[1] == ["---"] * 4
    assert all(len(line) == len(summary[0]) for line in summary)
    assert all(len(line) == len(collectives[0]) for line in collectives)
    rows = _rows()
    shape = _shape()
    assert [line[0] for line in summary[2:]] == list(rows)
    for mode, values, tokens, _weights, total, exact in summary[2:]:
        row = rows[mode]
        assert float(values) == row.values_per_token
        assert int(tokens.replace(",", "")) == row.tokens_per_gib(shape, 2)
        assert _size(total) == pytest.approx(row.collective_bytes, rel=5e-3)  # 3 significant digits
        assert exact == ("yes" if row.exact else "no")
    listed = {}
    for mode, name, _formula, size in collectives[2:]:
        listed.setdefault(mode, {})[name] = _size(size)
    assert listed == {mode: pytest.approx(_bytes(row), rel=5e-3) for mode, row in rows.items()}


def test_text_output_is_aligned(tmp_path, capsys):
    config = _write(tmp_path, TINY)
    assert main(["plan", str(config), "--tp", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("----"))
    starts = [m.start() for m in re.finditer(r"-+", lines[rule])]
    for line in lines[rule - 1: rule + 7]:
        for start in starts[1:]:
            assert line[start - 2:start] == "  " and line[start] != " ", (line, start)


GENERATED = re.compile(r"<!-- generated: (mla-plugin plan [^>]*?) -->\n(.*?)<!-- end generated -->", re.S)


def _command_output(command: str, capsys) -> str:
    argv = command.split()[1:]
    capsys.readouterr()
    assert main(argv) == 0
    return capsys.readouterr().out


def test_the_doc_tables_are_the_commands_current_output(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    blocks = GENERATED.findall(DOC.read_text())
    assert {command.split()[2] for command, _ in blocks} == {"docs/plan_configs/deepseek-v3.json",
                                                             "docs/plan_configs/deepseek-v2-lite.json"}
    for command, shown in blocks:
        assert "--tp 8" in command
        assert shown == _command_output(command, capsys), f"regenerate the output of `{command}` in {DOC.name}"


def test_the_readme_tables_are_the_commands_current_output(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    section = README.read_text().split("\n## Choosing a mode\n", 1)[1].split("\n## ", 1)[0]
    blocks = GENERATED.findall(section)
    assert len(blocks) == 2, "the README shows V3 and V2-Lite at TP 8"
    for command, shown in blocks:
        summary = _command_output(command, capsys).split("\n\n")[1] + "\n"  # the first table
        assert shown == summary, f"regenerate the summary of `{command}` in the README"


def test_the_docs_crossover_context_holds():
    """choosing_a_mode.md: exact moves fewer bytes than DCP's queries + outputs only below C = 544."""
    shape = plan.shape_from_config(json.loads((REPO / "docs/plan_configs/deepseek-v3.json").read_text()), "v3",
                                   Path("v3"))
    for context, exact_cheaper in ((543, True), (544, False)):
        step = plan.Step(batch=64, context=context)
        exact = _bytes(plan.sharded_latent(shape, 8, step, "exact"))["all-reduce of the partial latent logits"]
        dcp = _bytes(plan.dcp(shape, 8, step))
        moved = dcp["all-gather of the absorbed queries"] + dcp["reduce-scatter of the latent outputs"]
        assert (exact < moved) == exact_cheaper, context
    assert "C = 544" in DOC.read_text()


def test_plan_imports_no_framework():
    """Plain arithmetic: importing the module (and running it) loads no torch, vLLM, SGLang or transformers."""
    code = ("import sys; from pathlib import Path; from mla_plugin import plan; "
            "shape = plan.load_shape('docs/plan_configs/deepseek-v3.json'); plan.render(shape, 8, plan.Step(64, 8192)); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'vllm', 'sglang', 'transformers')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc
