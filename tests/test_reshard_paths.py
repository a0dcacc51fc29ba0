"""stablemoe-reshard-checkpoint never writes onto its input or any existing file, creates the output's folder,
and writes through a temporary file (issue 22, family 5; issue 24, point 2)."""
import multiprocessing
import os
import signal

import pytest
import torch

import helpers
from fairseq_stablemoe import reshard_checkpoint

pytestmark = pytest.mark.slow  # the fixture trains


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reshard")
    return os.path.join(helpers.trained_tiny_lm(tmp)[1], "checkpoint_last.pt")


def refused(capsys, *argv):
    with pytest.raises(SystemExit) as err:
        reshard_checkpoint.main([*map(str, argv), "--world-size", "1"])
    assert err.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1].split(": error: ")[-1]


def test_the_input_as_output_is_refused_and_untouched(checkpoint, tmp_path, capsys):
    before = open(checkpoint, "rb").read()
    link = tmp_path / "same.pt"
    link.symlink_to(checkpoint)
    for output in (checkpoint, link):
        assert refused(capsys, checkpoint, output) == (
            f"the output {output} is the input checkpoint: resharding drops the experts' optimizer state, so keep "
            f"the original and write to another file, e.g. NEW_DIR/checkpoint_last.pt")
    assert open(checkpoint, "rb").read() == before


def test_an_existing_output_or_a_directory_is_refused(checkpoint, tmp_path, capsys):
    other = tmp_path / "other.pt"
    other.write_bytes(b"a checkpoint of another run")
    assert refused(capsys, checkpoint, other).startswith(f"the output {other} exists: a checkpoint is never "
                                                         f"overwritten")
    assert other.read_bytes() == b"a checkpoint of another run"
    assert refused(capsys, checkpoint, tmp_path) == (f"the output {tmp_path} is a directory: name the file to "
                                                     f"write, e.g. {tmp_path}/checkpoint_last.pt")


def test_readmes_command_creates_the_folder(checkpoint, tmp_path, caplog):
    out = tmp_path / "ckpt1" / "checkpoint_last.pt"  # README: ... ckpt1/checkpoint_last.pt --world-size 1
    reshard_checkpoint.main([checkpoint, str(out), "--world-size", "1"])
    assert torch.load(out)["cfg"]["distributed_training"]["distributed_world_size"] == 1
    assert [f for f in os.listdir(out.parent)] == ["checkpoint_last.pt"]


def _reshard_and_die(checkpoint, out):
    def save_part_then_die(obj, f, *a, **k):
        f.write(b"PK\x03\x04" + b"\0" * 1000)
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save_part_then_die
    reshard_checkpoint.main([checkpoint, out, "--world-size", "1"])


def test_kill_9_during_the_write_leaves_no_cut_checkpoint(checkpoint, tmp_path):
    before = open(checkpoint, "rb").read()
    out = str(tmp_path / "new" / "checkpoint_last.pt")
    process = multiprocessing.get_context("fork").Process(target=_reshard_and_die, args=(checkpoint, out))
    process.start()
    process.join(120)
    assert process.exitcode == -signal.SIGKILL
    assert not os.path.exists(out)  # only a hidden temporary file, never a cut checkpoint under the name
    assert open(checkpoint, "rb").read() == before


def test_the_epochs_position_is_carried_to_the_new_number_of_processes():
    state = {"extra_state": {"train_iterator": {"epoch": 3, "iterations_in_epoch": 50, "version": 2}}}
    reshard_checkpoint.reshard_iterator_position(state, 1, 2)  # 50 batches taken by 1: 25 each for 2
    assert state["extra_state"]["train_iterator"]["iterations_in_epoch"] == 25
    reshard_checkpoint.reshard_iterator_position(state, 2, 4)
    assert state["extra_state"]["train_iterator"]["iterations_in_epoch"] == 12


@pytest.mark.distributed
def test_following_the_recipe_from_one_to_two_processes_mid_epoch(tmp_path):
    """1 process stops at update 10 of a 16-batch epoch; resharded for 2 (8 batches each), they resume after batch 5
    of their shards. fairseq alone, with the old position 10: 'Cannot resume training due to dataloader mismatch'."""
    from test_expert_parallel_fairseq import BATCHES, make_corpus, preprocess

    make_corpus(str(tmp_path))
    data = preprocess(str(tmp_path))
    first, two = str(tmp_path / "one"), str(tmp_path / "two")

    def args(save_dir, max_update):
        return [str(a) for a in helpers.train_lm_args(data, save_dir, *BATCHES, stage1=4, max_update=max_update)]

    helpers.wait(helpers.launch("fairseq_cli.train", args(first, 10), 1, str(tmp_path / "first")))
    state = torch.load(os.path.join(first, "checkpoint_last.pt"))
    assert state["extra_state"]["train_iterator"]["iterations_in_epoch"] == 10
    reshard_checkpoint.main([os.path.join(first, "checkpoint_last.pt"), os.path.join(two, "checkpoint_last.pt"),
                             "--world-size", "2"])
    [log0, _] = helpers.wait(helpers.launch("fairseq_cli.train", args(two, 12), 2, str(tmp_path / "resume")))
    assert "@ 10 updates)" in log0 and "num_updates 12" in log0 and "dataloader mismatch" not in log0
