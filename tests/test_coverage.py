"""A split mostly unscored is never a perplexity (issue 22, family 7): under any task, fairseq's own
language_modeling included, coverage is counted in tokens and the advice fits the flags given."""
import os
from types import SimpleNamespace

import numpy as np
import pytest

import helpers
from fairseq_stablemoe.tasks.skipped_samples import check_coverage


class Lines:
    """A dataset of samples of the given lengths (fairseq's num_tokens / num_tokens_vec)."""

    def __init__(self, sizes):
        self.sizes = np.asarray(sizes)

    def num_tokens(self, i):
        return int(self.sizes[i])

    def num_tokens_vec(self, indices):
        return self.sizes[indices]


def task(**args):
    return SimpleNamespace(args=SimpleNamespace(**args))


def test_coverage_is_counted_in_tokens(caplog):
    """One long sample of 400 tokens and 24 short ones: 4% of the samples but 80% of the tokens."""
    sizes = [400] + [4] * 24
    with pytest.raises(ValueError) as err:
        check_coverage(task(tokens_per_sample=512, sample_break_mode="none"), Lines(sizes), np.arange(25),
                       np.arange(1, 25), 64)
    assert str(err.value) == (
        "only 96 of the split's 496 tokens (19.4%) would be scored: 1 of 25 samples are longer than the model's 64 "
        "positions and fairseq skips them; pass --tokens-per-sample 64 (or less; the model was trained with at most "
        "64 positions; --tokens-per-sample 512 was given)")
    check_coverage(task(tokens_per_sample=512, sample_break_mode="none"), Lines([40] + [4] * 24), np.arange(25),
                   np.arange(1, 25), 32)
    assert "40 of the split's 136 tokens (29.4%) are SKIPPED: 1 of 25 samples are longer than the model's 32 " \
           "positions and fairseq skips them, so the result covers 70.6% of the tokens" in caplog.text


def test_eos_mode_advice_names_the_break_mode_not_the_tokens_per_sample_given():
    with pytest.raises(ValueError) as err:
        check_coverage(task(tokens_per_sample=64, sample_break_mode="eos"), Lines([100, 90]), np.arange(2),
                       np.arange(0), 64)
    assert str(err.value) == (
        "none of the split's 190 tokens would be scored: 2 of 2 samples are longer than the model's 64 positions and "
        "fairseq skips them; with --sample-break-mode eos a sample is a whole line (or document), and those longer "
        "than 64 tokens cannot be scored: pass --sample-break-mode none --tokens-per-sample 64, which cuts the text "
        "into blocks the model can score")


@pytest.mark.slow
def test_fairseqs_own_task_does_not_score_a_sliver_silently(tmp_path):
    data, save_dir = helpers.trained_tiny_lm(tmp_path)  # 32 positions
    ckpt = os.path.join(save_dir, "checkpoint_last.pt")
    argv = [data, "--user-dir", helpers.PLUGIN, "--path", ckpt, "--cpu", "--gen-subset", "test"]  # language_modeling
    status, log = helpers.run_forked("fairseq_cli.eval_lm", argv + ["--tokens-per-sample", 48],
                                     str(tmp_path / "48.log"))
    assert status != 0 and "Perplexity" not in log
    assert "only 9 of the split's 297 tokens (3.0%) would be scored: 6 of 7 samples are longer than the model's 32 " \
           "positions" in log, log[-2000:]
    status, log = helpers.run_forked("fairseq_cli.eval_lm", argv + ["--tokens-per-sample", 32],
                                     str(tmp_path / "32.log"))
    assert status == 0 and "Evaluated 297 tokens" in log

    # --sample-break-mode eos on lines longer than the model's positions (fairseq alone: "Evaluated 0 tokens ...
    # Perplexity: 1.00", exit 0)
    long_text = tmp_path / "long"
    long_text.mkdir()
    (long_text / "test.txt").write_text("".join(" ".join(f"w{(i + j) % 40}" for j in range(40)) + "\n"
                                                for i in range(5)))
    long_bin = helpers.run_cli("fairseq_cli.preprocess", [
        "--only-source", "--testpref", long_text / "test.txt", "--destdir", tmp_path / "long-bin",
        "--srcdict", os.path.join(data, "dict.txt"), "--workers", 1]) and str(tmp_path / "long-bin")
    status, log = helpers.run_forked("fairseq_cli.eval_lm", [long_bin, *argv[1:], "--tokens-per-sample", 32,
                                                             "--sample-break-mode", "eos"], str(tmp_path / "eos.log"))
    assert status != 0 and "Perplexity" not in log
    assert "none of the split's 205 tokens would be scored: 5 of 5 samples are longer than the model's 32 " \
           "positions and fairseq skips them; with --sample-break-mode eos a sample is a whole line" in log, log[-2000:]
