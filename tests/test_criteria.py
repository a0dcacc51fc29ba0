"""Our criteria report what fairseq's report (loss, nll_loss, ppl, accuracy) and add only the MoE keys."""
import argparse

import pytest
import torch
from fairseq import metrics
from fairseq.criterions.cross_entropy import CrossEntropyCriterion
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion

import helpers
from fairseq_stablemoe.criterions.stablemoe_cross_entropy import StableMoECrossEntropyCriterion
from fairseq_stablemoe.criterions.stablemoe_label_smoothed_cross_entropy import (
    StableMoELabelSmoothedCrossEntropyCriterion,
)
from helpers import make_dictionary
from test_translation import build_model

REPORTED = ("loss", "nll_loss", "ppl", "accuracy")


def reported(criterion, model, sample):
    """The smoothed values fairseq would print for one batch."""
    _, _, log = criterion(model, sample)
    with metrics.aggregate(new_root=True) as agg:
        criterion.__class__.reduce_metrics([log])
        return {k: v for k, v in agg.get_smoothed_values().items()}


def assert_same_report(ours, fairseqs):
    for key in REPORTED:
        if key in fairseqs:
            assert ours[key] == pytest.approx(fairseqs[key], rel=1e-6), key
    assert any(key.startswith("load") for key in ours), "and the MoE keys"


@pytest.mark.parametrize("sentence_avg", [False, True])
def test_language_model_report_equals_cross_entropy(tmp_path, sentence_avg):
    model, task = helpers.build_lm(tmp_path)
    model.eval()  # no MoE loss: the reports must be equal
    tokens = torch.randint(4, len(task.dictionary), (3, 9))
    target = torch.cat([tokens[:, 1:], tokens.new_full((3, 1), task.dictionary.eos())], 1)
    target[2, 5:] = task.dictionary.pad()
    sample = {"net_input": {"src_tokens": tokens}, "target": target,
              "ntokens": int(target.ne(task.dictionary.pad()).sum())}
    ours = StableMoECrossEntropyCriterion(task, sentence_avg, 0.3, 0.3, 0.01)
    with torch.no_grad():
        mine, theirs = reported(ours, model, sample), reported(CrossEntropyCriterion(task, sentence_avg), model, sample)
    assert_same_report(mine, theirs)
    assert mine["ppl"] == pytest.approx(theirs["ppl"], rel=1e-6)


@pytest.mark.parametrize("sentence_avg", [False, True])
def test_translation_report_equals_label_smoothed_cross_entropy(sentence_avg):
    d = make_dictionary()
    model = build_model(d)
    task = argparse.Namespace(target_dictionary=d)
    src = torch.tensor([[12, 13, 14, d.eos()], [d.pad(), 15, 16, d.eos()]])
    prev = torch.tensor([[d.eos(), 30, 31, 32], [d.eos(), 33, d.pad(), d.pad()]])
    target = torch.tensor([[30, 31, 32, d.eos()], [33, d.eos(), d.pad(), d.pad()]])
    sample = {"net_input": {"src_tokens": src, "src_lengths": torch.tensor([4, 3]), "prev_output_tokens": prev},
              "target": target, "ntokens": int(target.ne(d.pad()).sum())}
    ours = StableMoELabelSmoothedCrossEntropyCriterion(task, sentence_avg, 0.1, report_accuracy=True)
    fairseqs = LabelSmoothedCrossEntropyCriterion(task, sentence_avg, 0.1, report_accuracy=True)
    with torch.no_grad():
        mine, theirs = reported(ours, model, sample), reported(fairseqs, model, sample)
    assert set(REPORTED) <= set(theirs)
    assert_same_report(mine, theirs)
