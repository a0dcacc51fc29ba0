"""A string in a config field that fairseq passes to eval() never runs: every path that loads a checkpoint
refuses it, naming the field, before a model is built."""
import os
import re

import pytest
import torch

import helpers


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("payload")
    data, save_dir = helpers.trained_tiny_lm(tmp)
    return data, os.path.join(save_dir, "checkpoint_last.pt")


def payload_checkpoint(source, path, marker, field="adaptive_softmax_cutoff", section="model"):
    state = torch.load(source)
    state["cfg"][section][field] = f"__import__('os').system('touch {marker}') or [100]"
    torch.save(state, path)
    return path


def loading_paths(data, ckpt, tmp):
    lm = ["--user-dir", helpers.PLUGIN, "--cpu"]
    return {
        "fairseq-eval-lm": ("fairseq_cli.eval_lm", [data, "--path", ckpt, "--tokens-per-sample", 32, *lm]),
        "fairseq-generate": ("fairseq_cli.generate", [data, "--task", "stablemoe_language_modeling", "--path", ckpt,
                                                      "--tokens-per-sample", 32, "--max-len-b", 4, *lm]),
        "fairseq-train --restore-file": ("fairseq_cli.train", helpers.train_lm_args(
            data, str(tmp / "resume"), "--restore-file", ckpt, max_update=5)),
        "fairseq-train --finetune-from-model": ("fairseq_cli.train", helpers.train_lm_args(
            data, str(tmp / "finetune"), "--finetune-from-model", ckpt, max_update=5)),
        "expert_tokens": ("fairseq_stablemoe.analysis.expert_tokens", [data, "--path", ckpt, "--cpu"]),
        "reshard_checkpoint": ("fairseq_stablemoe.reshard_checkpoint", [ckpt, tmp / "resharded.pt",
                                                                        "--world-size", 1]),
    }


@pytest.mark.parametrize("path_name", ["fairseq-eval-lm", "fairseq-generate", "fairseq-train --restore-file",
                                       "fairseq-train --finetune-from-model", "expert_tokens", "reshard_checkpoint"])
def test_code_in_a_checkpoint_config_never_runs(trained, tmp_path, path_name):
    data, source = trained
    marker = tmp_path / "MARKER"
    ckpt = payload_checkpoint(source, str(tmp_path / "payload.pt"), marker)
    module, argv = loading_paths(data, ckpt, tmp_path)[path_name]
    code, log = helpers.run_forked(module, argv, str(tmp_path / "run.log"))
    assert not marker.exists(), f"{path_name} ran the checkpoint's code"
    assert code != 0
    assert "config field model.adaptive_softmax_cutoff = \"__import__('os')" in log, log[-3000:]


def test_every_field_is_checked_and_literals_pass():
    from fairseq_stablemoe.safe_config import EVALUATED_FIELDS, UnsafeConfigError, refuse_evaluated_code

    for name in EVALUATED_FIELDS:
        with pytest.raises(UnsafeConfigError, match=re.escape(f"config field model.{name} = ")):
            refuse_evaluated_code({"model": {name: "open('x', 'w')"}})
        refuse_evaluated_code({"model": {name: "[(1, 64), (2, 128)]"}})  # what fairseq itself writes
    refuse_evaluated_code({"model": {"adaptive_softmax_cutoff": "10000,50000", "left_pad_source": "True"}})
    with pytest.raises(UnsafeConfigError, match="config field task.encoder.xformers_att_config"):
        refuse_evaluated_code({"encoder": {"xformers_att_config": "exit()"}}, "task")


def test_no_evaluated_field_of_fairseq_is_missing():
    """Search all of fairseq's source (examples included: any model or task a checkpoint may name) for eval calls
    on config attributes."""
    import fairseq

    from fairseq_stablemoe.safe_config import EVALUATED_FIELDS

    root = os.path.dirname(fairseq.__file__)
    call = re.compile(r"(?:eval_str_list|eval_str_dict|eval_bool|(?<![\w.])eval)\(\s*(?:self\.)?"
                      r"(?:args|cfg|\w+_cfg|cfg\.\w+)\.(\w+)")
    found = set()
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                found.update(call.findall(open(os.path.join(folder, name), errors="replace").read()))
    assert found >= {"adaptive_softmax_cutoff", "character_filters", "adaptive_input_cutoff", "adam_betas",
                     "left_pad_source", "conv_feature_layers"}
    assert found <= set(EVALUATED_FIELDS), f"fairseq evaluates fields we do not check: {found - set(EVALUATED_FIELDS)}"
