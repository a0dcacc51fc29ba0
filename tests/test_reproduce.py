"""examples/reproduce: the paper-scale configs say what Tables 7 and 8 say, and the --quick entry points run."""
import os
import re
import subprocess
import sys

import pytest

from helpers import ROOT, write_corpus, write_parallel_corpus

REPRODUCE = os.path.join(ROOT, "examples", "reproduce")
sys.path.insert(0, REPRODUCE)


def paper_scale_args(script, **env):
    """PRINT=1's output is a command to paste: run it in bash with a fairseq-train that prints its arguments."""
    name, *size = script.split()
    out = subprocess.run(["bash", os.path.join(REPRODUCE, "paper_scale", name), *size, "DATA", "SAVE"],
                         env=dict(os.environ, PRINT="1", **env), capture_output=True, text=True, check=True).stdout
    assert out.startswith("fairseq-train ") and all(len(line) <= 120 for line in out.splitlines()), out
    pasted = subprocess.run(["bash", "-c", 'fairseq-train() { printf "%s\\n" "$@"; }\n' + out],
                            capture_output=True, text=True, check=True).stdout
    from fairseq import options

    argv = pasted.strip("\n").split("\n")
    parser = options.get_training_parser()
    return options.parse_args_and_arch(parser, argv)


@pytest.mark.parametrize("script, experts, sublayers, dim, ffn, heads, blocks, lr, gpus", [
    ("lm.sh base", 32, 3, 768, 3072, 12, 12, 6e-4, 32),
    ("lm.sh large", 64, 6, 1024, 4096, 16, 24, 3e-4, 64),
])
def test_lm_paper_scale_is_table_7(script, experts, sublayers, dim, ffn, heads, blocks, lr, gpus):
    a = paper_scale_args(script)
    assert (a.moe_experts, a.moe_layers, a.moe_sublayers) == (experts, 1, sublayers)
    assert (a.decoder_embed_dim, a.decoder_ffn_embed_dim, a.decoder_attention_heads, a.decoder_layers) == \
        (dim, ffn, heads, blocks)
    assert a.tokens_per_sample == 1024 and a.batch_size * a.tokens_per_sample * a.update_freq[0] * gpus == 524288
    assert a.distributed_world_size == gpus
    assert (a.lr[0], a.adam_betas, a.clip_norm, a.dropout, a.attention_dropout) == (lr, "(0.9, 0.98)", 0.1, 0, 0)
    assert (a.lr_scheduler, a.power, a.warmup_updates, a.max_update) == ("polynomial_decay", 1, 2000, 60000)
    assert (a.stage1_updates, a.balance_factor, a.distilled_dim, a.distilled_router) == ("6000", 0.3, 50, "wordemb")
    assert a.decoder_learned_pos and a.decoder_normalize_before and a.share_decoder_input_output_embed


def test_mt_paper_scale_is_table_8():
    a = paper_scale_args("mt_wmt.sh")
    assert (a.moe_experts, a.encoder_moe_layers, a.decoder_moe_layers, a.moe_sublayers) == (32, 1, 1, 3)
    assert (a.encoder_layers, a.decoder_layers, a.encoder_embed_dim, a.encoder_ffn_embed_dim,
            a.encoder_attention_heads) == (6, 6, 512, 2048, 8)
    assert a.max_tokens * a.update_freq[0] * a.distributed_world_size == 524288
    assert (a.max_source_positions, a.lr[0], a.lr_scheduler, a.warmup_updates, a.max_update) == \
        (256, 5e-4, "inverse_sqrt", 4000, 352000)
    assert (a.dropout, a.attention_dropout, a.label_smoothing, a.clip_norm) == (0.1, 0, 0.1, 0.1)
    assert (a.stage1_updates, a.balance_factor) == ("30000", 0.3)  # a number of updates, or auto


def test_training_curve_keeps_the_resumed_attempt():
    from lm import training_curve

    def inner(update, wall):
        return f'x | INFO | train_inner | {{"num_updates": "{update}", "train_wall": "{wall}"}}'

    def valid(update, ppl):
        return f'x | INFO | valid1 | {{"valid1_ppl": "{ppl}", "valid1_num_updates": "{update}"}}'

    log = "\n".join([inner(10, 5), valid(10, 90), inner(20, 6), valid(20, 80),  # killed after update 20
                     inner(20, 7), valid(20, 70), inner(30, 4), valid(30, 60)])  # resumed from update 10
    assert training_curve(log) == [{"update": 10, "train_seconds": 5.0, "ppl": 90.0},
                                   {"update": 20, "train_seconds": 12.0, "ppl": 70.0},
                                   {"update": 30, "train_seconds": 16.0, "ppl": 60.0}]


def test_agreement_at_freeze_is_the_last_interval_wholly_in_stage_1(tmp_path):
    from lm import agreement_at_freeze

    def inner(update, stage, acc):
        return f'x | INFO | train_inner | {{"num_updates": "{update}", "stage": "{stage}", "distill_acc": "{acc}"}}'
    log = tmp_path / "train.log"
    log.write_text("\n".join([inner(25, 1, 0.2), inner(50, 1, 0.4), inner(75, 1.6, 0.3), inner(100, 2, 0.1)]))
    assert agreement_at_freeze(str(log)) == (50, 0.4)


def run_entry(script, *args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(REPRODUCE, script), "--quick", *map(str, args)],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def table_rows(path):
    return [line for line in open(path).read().splitlines() if line.startswith("| ") and "---" not in line][1:]


@pytest.mark.slow
def test_quick_lm_ablation_trains_scores_and_resumes(tmp_path):
    data = write_corpus(str(tmp_path / "text"), lines=(300, 40, 40))
    run_entry("table5.py", "--data", data, "--out", tmp_path / "out")
    rows = table_rows(tmp_path / "out" / "quick" / "table5.md")
    assert len(rows) == 4
    for row in rows:
        valid, test = (float(cell) for cell in row.split("|")[2:4])
        assert 1 < valid < 1000 and 1 < test < 1000
    again = run_entry("table5.py", "--data", data, "--out", tmp_path / "out")
    assert "training " not in again  # every run's result is reused


@pytest.mark.slow
def test_quick_translation_table(tmp_path):
    data = tmp_path / "mt"
    write_parallel_corpus(str(data), sizes=(("train", 200), ("valid", 10), ("test", 10)))
    run_entry("table3.py", "--data", data, "--out", tmp_path / "out")
    rows = table_rows(tmp_path / "out" / "quick" / "table3.md")
    assert [row.split("|")[1].strip() for row in rows] == [
        "Standard Transformer", "Larger Transformer", "Switch Transformer", "BASE Layer", "Hash Layer", "StableMoE"]


def run_driver(driver: str):
    """`python -c driver` with this checkout's plugin first on the path; it must succeed."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", driver], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_long_translation_report_on_a_tiny_scale(tmp_path):
    """table3.py --long's path (X→En only, a checkpoint scored every interval, the report) with LONG shrunk."""
    data = tmp_path / "mt"
    write_parallel_corpus(str(data), sizes=(("train", 200), ("valid", 10), ("test", 10)))
    driver = (f"import sys; sys.path.insert(0, {REPRODUCE!r}); from dataclasses import replace; import table3; "
              f"table3.LONG = replace(table3.QUICK, x2en_only=True, curve_interval=5, curve_langs=('xx',)); "
              f"sys.argv = ['table3.py', '--long', '--data', {str(data)!r}, '--out', {str(tmp_path / 'out')!r}]; "
              f"table3.main()")
    run_driver(driver)
    report = open(tmp_path / "out" / "long" / "table3.md").read()
    assert [row.split("|")[1].strip() for row in table_rows(tmp_path / "out" / "long" / "table3.md")][:2] == [
        "Standard Transformer", "StableMoE"]
    assert "sacreBLEU signature: `nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:" in report
    # the learning curve's rows (model, update, valid ppl, xx BLEU): the wall-seconds table's "| StableMoE | 5 |"
    # (a run of 5 s) is not one of them
    row = re.compile(r"^\| StableMoE \| (5|10) \| [\d.]+ \| [\d.]+ \|$")
    curve = [line for line in report.splitlines() if row.match(line)]
    assert len(curve) == 2, report  # updates 5 and 10 of 10, each with its validation ppl
    # the router's agreement in the last logged update of stage 1 (= update 1 of 10), the frozen routing's load
    assert re.search(r"^\| StableMoE \| [\d.]+ % \(update 1\) \| [\d.]+ \| [\d.]+ \|$", report, re.M), report


def test_missing_data_names_the_flag(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, os.path.join(REPRODUCE, "table3.py"), "--quick", "--data",
                           str(tmp_path), "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "--data" in proc.stderr and "xx-en/" in proc.stderr


def test_medium_mode_is_the_16x_model_of_issue_20(monkeypatch, tmp_path):
    """--medium: 4 blocks of 128/512, 4 heads, 8 experts × 2, BPE 1,000, 16 × 128 tokens, 3,000 updates, stage 1
    300, lr 2e-3 with 150 warm-up updates, eval on 100 lines, seeds 1–2; its own results folder."""
    import lm

    monkeypatch.setattr(sys, "argv", ["hash_gap.py", "--medium", "--out", str(tmp_path)])
    repro = lm.setup("doc")
    assert repro.scale is lm.MEDIUM and repro.out == os.path.join(str(tmp_path), "medium")
    assert repro.seeds() == [1, 2] and repro.scale.vocab == 1000 and repro.scale.eval_lines == 100
    flags = [str(f) for f in repro.train_flags(lm.STABLEMOE, "DATA", "SAVE")]
    value = {flag: flags[i + 1] for i, flag in enumerate(flags[:-1]) if flag.startswith("--")}
    assert (value["--decoder-embed-dim"], value["--decoder-ffn-embed-dim"], value["--decoder-layers"],
            value["--decoder-attention-heads"]) == ("128", "512", "4", "4")
    assert (value["--moe-experts"], value["--moe-sublayers"], value["--batch-size"], value["--tokens-per-sample"]) \
        == ("8", "2", "16", "128")
    assert (value["--max-update"], value["--stage1-updates"], value["--lr"], value["--warmup-updates"]) == \
        ("3000", "300", "0.002", "150")


def test_medium_is_refused_by_translation(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(REPRODUCE, "table3.py"), "--medium", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 1 and "--medium is a language-model mode" in proc.stderr


@pytest.mark.slow
def test_hash_gap_reads_each_seed_stablemoe_table(tmp_path):
    """hash_gap.py's path: the table-from-update-0 row waits for the same seed's StableMoE run and routes by the
    table it froze; the report pairs them by seed and shows the gate (rows cut to those two, QUICK cut to 8
    updates)."""
    data = write_corpus(str(tmp_path / "text"), lines=(300, 40, 40))
    driver = (f"import sys; sys.path.insert(0, {REPRODUCE!r}); from dataclasses import replace; import lm, hash_gap; "
              f"lm.QUICK = replace(lm.QUICK, updates=8); hash_gap.ROWS = [hash_gap.TABLE_GATED, hash_gap.STABLEMOE]; "
              f"sys.argv = ['hash_gap.py', '--quick', '--data', {data!r}, '--out', {str(tmp_path / 'out')!r}]; "
              f"hash_gap.main()")
    run_driver(driver)
    import torch

    runs = tmp_path / "out" / "quick" / "runs"
    source = torch.load(runs / "stablemoe-s1" / "checkpoint_last.pt", weights_only=True)["model"]
    fresh = torch.load(runs / "stablemoe-table-from-update-0-gate-s1" / "checkpoint_last.pt", weights_only=True)
    learned = [v for k, v in source.items() if k.endswith("distilled_router.table")][0]
    used = [v for k, v in fresh["model"].items() if k.endswith("routing.table")][0]
    assert torch.equal(learned, used) and learned.min() >= 0
    report = open(tmp_path / "out" / "quick" / "hash_gap.md").read()
    rows = {row.split("|")[1].strip(): row for row in table_rows(tmp_path / "out" / "quick" / "hash_gap.md")}
    assert set(rows) == {"StableMoE", "StableMoE table from update 0 + gate"}
    assert all(re.search(r"\| 1 \| 0\.\d\d \| 0\.\d\d \| [\d.]+ \|$", row) for row in rows.values())  # the gate
    assert "StableMoE − StableMoE table from update 0 + gate = " in report
