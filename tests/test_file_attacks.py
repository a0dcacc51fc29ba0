"""Nothing a checkpoint file holds runs code or gives a silently wrong number, whatever model and task it names
(issue 22, families 1 and 2): fairseq's own loader is checked once the plugin is imported."""
import os
import struct
import zipfile

import pytest
import torch
from fairseq import checkpoint_utils, options, utils

import helpers
from fairseq_stablemoe.checkpoints import CheckpointError, check_checkpoint
from fairseq_stablemoe.safe_config import UnsafeConfigError

pytestmark = pytest.mark.slow  # the module's fixture trains; a few tests run fairseq-eval-lm


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attacks")
    data, save_dir = helpers.trained_tiny_lm(tmp)
    return data, os.path.join(save_dir, "checkpoint_last.pt")


def rewritten(source, path, change):
    state = torch.load(source)
    change(state)
    torch.save(state, path)
    return str(path)


def code(marker):
    return f"__import__('os').system('touch {marker}') or [100]"


def test_eval_lm_runs_no_code_when_the_file_names_fairseqs_own_model(trained, tmp_path):
    data, source = trained
    marker = tmp_path / "MARKER"

    def fairseq_names(state):
        state["cfg"]["model"]["_name"] = "transformer_lm"
        state["cfg"]["task"]["_name"] = "language_modeling"
        state["cfg"]["model"]["adaptive_softmax_cutoff"] = code(marker)

    ckpt = rewritten(source, tmp_path / "evil.pt", fairseq_names)
    status, log = helpers.run_forked("fairseq_cli.eval_lm", [data, "--user-dir", helpers.PLUGIN, "--path", ckpt,
                                                             "--tokens-per-sample", 32, "--cpu"],
                                     str(tmp_path / "eval.log"))
    assert not marker.exists(), "fairseq-eval-lm ran the checkpoint's code"
    assert status != 0 and "config field model.adaptive_softmax_cutoff = \"__import__('os')" in log, log[-2000:]


def test_from_pretrained_runs_no_code_whatever_the_task_name(trained, tmp_path):
    import fairseq_stablemoe

    data, source = trained
    marker = tmp_path / "MARKER"

    def translation_names(state):
        state["cfg"]["task"]["_name"] = "translation_multi_simple_epoch"
        state["cfg"]["task"]["left_pad_source"] = f"__import__('os').system('touch {marker}')"

    rewritten(source, tmp_path / "model.pt", translation_names)
    with pytest.raises(UnsafeConfigError, match="config field task.left_pad_source = "):
        fairseq_stablemoe.StableMoELanguageModel.from_pretrained(str(tmp_path), "model.pt", data_name_or_path=data)
    assert not marker.exists()


@pytest.mark.parametrize("section,field,value", [
    ("optimizer", "adam_betas", "__import__('os').getcwd() and (0.9, 0.98)"),  # evaluated by fairseq's Adam
    ("model", "decoder_layers", "[exec('x=1')]"),  # fconv evaluates it: refused for any model name
    ("common", "tensorboard_logdir", "${oc.env:HOME}"),  # an OmegaConf resolver call
])
def test_fairseqs_loader_checks_the_whole_config(trained, tmp_path, section, field, value):
    ckpt = rewritten(trained[1], tmp_path / "x.pt", lambda s: s["cfg"][section].__setitem__(field, value))
    with pytest.raises(UnsafeConfigError, match=f"config field {section}.{field} = "):
        checkpoint_utils.load_checkpoint_to_cpu(ckpt)


def test_fairseqs_eval_helpers_read_literals_only():
    from fairseq.data.multilingual import multilingual_data_manager

    for helper in (utils.eval_str_list, options.eval_str_list):
        assert helper("10000,50000", int) == [10000, 50000]
        assert helper("[(512, 3)] * 2", str) == ["(512, 3)", "(512, 3)"]
        with pytest.raises(UnsafeConfigError):
            helper("__import__('os').getcwd()")
    for helper in (utils.eval_bool, options.eval_bool, multilingual_data_manager.utils.eval_bool):
        assert helper("True") is True and helper("False") is False
        with pytest.raises(UnsafeConfigError):
            helper("exit()")
    assert multilingual_data_manager.eval_str_dict('{"main": "src"}') == {"main": "src"}
    with pytest.raises(UnsafeConfigError):
        multilingual_data_manager.eval_str_dict("dict(a=print('x'))")


def member_data_offset(path, member_suffix):
    """(name, offset of the first byte of the member's data) of a zip member."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if member_suffix in i.filename and i.file_size >= 64)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    return info.filename, info.header_offset + 30 + name_len + extra_len


def test_a_flipped_bit_in_a_tensor_is_refused(trained, tmp_path):
    """The zip's structure intact, one tensor's bytes changed: torch would load it and give other numbers."""
    data, source = trained
    ckpt = str(tmp_path / "flipped.pt")
    with open(source, "rb") as f:
        raw = bytearray(f.read())
    name, offset = member_data_offset(source, "/data/")
    raw[offset + 3] ^= 0x80  # a float's sign bit
    open(ckpt, "wb").write(raw)
    torch.load(ckpt)  # torch itself does not notice
    with pytest.raises(CheckpointError, match=f"is corrupt: the stored checksum \\(CRC-32\\) of its part {name} "):
        check_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="is corrupt"):
        checkpoint_utils.load_checkpoint_to_cpu(ckpt)  # fairseq-eval-lm, --restore-file, from_pretrained
    status, log = helpers.run_forked("fairseq_cli.eval_lm", [data, "--user-dir", helpers.PLUGIN, "--path", ckpt,
                                                             "--tokens-per-sample", 32, "--cpu"],
                                     str(tmp_path / "eval.log"))
    assert status != 0 and "is corrupt" in log and "Perplexity" not in log


def test_non_finite_weights_are_refused_naming_the_tensor(trained, tmp_path):
    data, source = trained
    key = next(k for k in torch.load(source)["model"] if "centroids" in k or "expert_embeddings" in k
               or "routing" in k and k.endswith("weight"))
    ckpt = rewritten(source, tmp_path / "nan.pt", lambda s: s["model"][key].view(-1)[0].fill_(float("nan")))
    with pytest.raises(CheckpointError, match=f"model weight {key} holds 1 non-finite value"):
        checkpoint_utils.load_checkpoint_to_cpu(ckpt)
    status, log = helpers.run_forked("fairseq_cli.train", helpers.train_lm_args(
        data, str(tmp_path / "resume"), "--restore-file", ckpt, max_update=8), str(tmp_path / "train.log"))
    assert status != 0 and f"model weight {key} holds" in log, log[-2000:]
