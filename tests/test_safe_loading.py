"""Safe loading on torch >= 2.6: our checkpoints load through an allow-list of exactly what fairseq stores;
any other pickled object is refused before it can run."""
import argparse
import os
import pickle

import pytest
import torch
from fairseq import checkpoint_utils

import helpers
from fairseq_stablemoe.checkpoints import FAIRSEQ_CHECKPOINT_GLOBALS, CheckpointError, check_checkpoint, unsafe_globals

pytestmark = [
    pytest.mark.slow,  # the module's fixture trains through both stages
    pytest.mark.skipif(not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"),
                       reason="torch < 2.5 has no weights-only loading by default"),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real checkpoint: 4 updates of fairseq-train with --amp (which also shows --amp runs on CPU)."""
    tmp = tmp_path_factory.mktemp("safe")
    save_dir = str(tmp / "ckpt")
    log = helpers.run_fairseq_train(helpers.train_lm_args(helpers.tiny_lm_data(tmp), save_dir, "--amp", stage1=2,
                                                          max_update=4), str(tmp / "train.log"))
    assert "num_updates 4" in log
    return os.path.join(save_dir, "checkpoint_last.pt")


def test_amp_trains_on_cpu_through_both_stages(checkpoint):
    state = checkpoint_utils.load_checkpoint_to_cpu(checkpoint)
    assert state["cfg"]["common"]["amp"] is True
    assert helpers.saved_stage(state["model"]) == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if torch.is_tensor(v) and v.is_floating_point())


def test_the_allow_list_is_exactly_what_fairseq_stores(checkpoint, tmp_path):
    assert FAIRSEQ_CHECKPOINT_GLOBALS[0] is argparse.Namespace  # the rest: what multi-rank resume broadcasts
    # fairseq 0.12 stores no pickled class at all ...
    assert torch.serialization.get_unsafe_globals_in_checkpoint(checkpoint) == []
    # ... older fairseq stored its argparse.Namespace `args`: listed by torch, accepted by our allow-list
    state = torch.load(checkpoint)
    state["args"] = argparse.Namespace(arch="stablemoe_lm_tiny", seed=1)
    older = str(tmp_path / "older.pt")
    torch.save(state, older)
    assert "argparse.Namespace" in _globals_in(older)
    assert unsafe_globals(older) == []
    assert torch.load(older)["args"].arch == "stablemoe_lm_tiny"  # weights_only=True, as fairseq calls it
    check_checkpoint(older)


def _globals_in(path):
    """Every GLOBAL the checkpoint's pickle names (allowed or not)."""
    import pickletools
    import zipfile

    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            found.add(".".join(strings[-2:]))
        elif op.name == "GLOBAL":
            found.add(arg.replace(" ", "."))
    return found


class Payload:
    """Unpickling this runs a command that would leave a file behind."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Custom:
    pass


@pytest.mark.parametrize("make,named,torch_names", [
    (lambda tmp: Payload(tmp / "pwned"), "posix.system", "GLOBAL posix.system"),
    (lambda tmp: Custom(), f"{__name__}.Custom", f"GLOBAL {__name__}.Custom"),
    (lambda tmp: print, "builtins.print", "GLOBAL print"),
], ids=["os.system", "custom-class", "builtin-function"])
def test_any_other_pickled_object_is_refused(checkpoint, tmp_path, make, named, torch_names):
    state = torch.load(checkpoint)
    state["extra_state"]["smuggled"] = make(tmp_path)
    path = str(tmp_path / "smuggled.pt")
    torch.save(state, path)
    # fairseq-eval-lm / fairseq-generate: the plugin's wrapped loader refuses it before torch unpickles it
    with pytest.raises(CheckpointError) as err:
        checkpoint_utils.load_checkpoint_to_cpu(path)
    assert f"({named}); we refuse arbitrary pickles" in str(err.value)
    # torch's weights-only unpickler, beneath it, refuses it too, naming the global
    with pytest.raises(pickle.UnpicklingError) as err:
        torch.load(path)
    assert torch_names in str(err.value)
    # fairseq-train (resume / --restore-file): refused before fairseq loads it, with our message
    with pytest.raises(CheckpointError) as err:
        check_checkpoint(path)
    assert f"({named}); we refuse arbitrary pickles" in str(err.value)
    assert not (tmp_path / "pwned").exists()  # nothing ran


def test_truncated_checkpoint_is_refused_by_the_loader_with_a_clear_message(checkpoint, tmp_path):
    path = str(tmp_path / "truncated.pt")
    with open(checkpoint, "rb") as f, open(path, "wb") as g:
        g.write(f.read()[: os.path.getsize(checkpoint) // 2])
    with pytest.raises(CheckpointError, match="is truncated or not a checkpoint"):
        checkpoint_utils.load_checkpoint_to_cpu(path)
