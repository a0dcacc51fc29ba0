"""Small promises of the example scripts a newcomer runs first: what they print and when they refuse."""
import os
import subprocess
import sys

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "examples", "multilingual_translation"))


def test_bleu_md_ends_with_a_newline_so_printed_tables_do_not_run_together():
    from evaluate import bleu_markdown

    text = bleu_markdown([("X→En", {"de": 1.234, "fr": 2.0})], "StableMoE", "nrefs:1|case:mixed")
    assert text == ("| X→En | de | fr | Avg |\n|---|---|---|---|\n| StableMoE | 1.23 | 2.00 | 1.62 |\n\n"
                    "sacreBLEU signature: `nrefs:1|case:mixed`\n")


def test_fluctuation_run_sh_names_the_command_when_SOTU_has_no_text(tmp_path):
    script = os.path.join(ROOT, "examples", "fluctuation", "run.sh")
    proc = subprocess.run(["bash", script], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, SOTU=str(tmp_path / "nowhere"), OUT=str(tmp_path / "out")))
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == (f"SOTU={tmp_path}/nowhere has no train.txt and valid.txt; fetch them with: "
                           f"python {ROOT}/examples/demo/prepare_sotu.py {tmp_path}/nowhere\n")
