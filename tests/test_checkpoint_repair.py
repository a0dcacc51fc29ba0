"""The repair of a checkpoint fairseq was copying when the run was killed (issue 22, family 3): it touches only the
files fairseq names, picks its source by the update count stored inside, never loses a file and says what it did."""
import logging
import os

import torch

from fairseq_stablemoe.checkpoints import prepare_resume


def stored_update(path):
    return torch.load(path)["optimizer_history"][-1]["num_updates"]


def save(path, update):
    torch.save({"model": {"w": torch.full((4,), float(update))}, "optimizer_history": [{"num_updates": update}],
                "cfg": {"common": {"seed": 1}}}, path)
    return str(path)


def truncate(path, keep=300):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:keep])


def set_mtime(path, t):
    os.utime(path, (t, t))


def test_a_users_file_beside_the_checkpoints_is_never_touched(tmp_path, caplog):
    save(tmp_path / "checkpoint_1_10.pt", 10)
    save(tmp_path / "checkpoint_last.pt", 10)
    notes = tmp_path / "checkpoint_notes.pt"
    notes.write_text("my notes about this run\n")
    other = tmp_path / "checkpoint_last.pt.bak"
    other.write_text("a backup the user made\n")
    with caplog.at_level(logging.WARNING, logger="fairseq_stablemoe"):
        prepare_resume(str(tmp_path), "checkpoint_last.pt")
    assert notes.read_text() == "my notes about this run\n" and other.read_text() == "a backup the user made\n"
    assert "checkpoint_notes" not in caplog.text


def test_the_source_is_the_checkpoint_with_most_updates_not_the_newest_file(tmp_path, caplog):
    paths = {u: save(tmp_path / f"checkpoint_1_{u}.pt", u) for u in (10, 20, 30)}
    last = save(tmp_path / "checkpoint_last.pt", 30)
    truncate(last)
    set_mtime(paths[30], 1000), set_mtime(paths[20], 2000), set_mtime(paths[10], 3000)  # mtimes lie
    intact = {u: open(p, "rb").read() for u, p in paths.items()}
    with caplog.at_level(logging.WARNING, logger="fairseq_stablemoe"):
        assert prepare_resume(str(tmp_path), "checkpoint_last.pt") == last
    assert stored_update(last) == 30
    assert all(open(p, "rb").read() == intact[u] for u, p in paths.items())  # the intact ones untouched
    assert os.path.getsize(f"{last}.damaged") == 300  # the damaged copy is kept, not destroyed
    assert f"replaced it with a copy of {paths[30]}, the intact checkpoint with the most updates (30): " \
           f"resuming from update 30" in caplog.text


def test_a_truncated_best_says_what_it_now_holds_and_the_run_resumes_from_the_newest(tmp_path, caplog):
    """Killed while fairseq copied the save of update 18 to checkpoint_best.pt: checkpoint_last.pt still holds 15."""
    last = save(tmp_path / "checkpoint_last.pt", 15)
    newest = save(tmp_path / "checkpoint_1_18.pt", 18)
    best = save(tmp_path / "checkpoint_best.pt", 18)
    truncate(best)
    set_mtime(last, 1000), set_mtime(newest, 2000), set_mtime(best, 2001)
    with caplog.at_level(logging.WARNING, logger="fairseq_stablemoe"):
        assert prepare_resume(str(tmp_path), "checkpoint_last.pt") == last
    assert stored_update(best) == 18 and stored_update(last) == 18  # resumes from 18: 18 is never overwritten
    assert stored_update(f"{last}.update15") == 15
    text = caplog.text
    assert "checkpoint_best.pt now holds the model of update 18, which may not be the one with the best " \
           "validation loss" in text
    assert f"{last} held update 15 but {newest} (written after it) holds update 18" in text
    assert "resuming from update 18" in text and "resuming from update 15" not in text


def test_a_truncated_numbered_copy_is_moved_aside(tmp_path, caplog):
    save(tmp_path / "checkpoint_last.pt", 20)
    copy = save(tmp_path / "checkpoint_1_20.pt", 20)
    truncate(copy)
    with caplog.at_level(logging.WARNING, logger="fairseq_stablemoe"):
        prepare_resume(str(tmp_path), "checkpoint_last.pt")
    assert not os.path.exists(copy) and os.path.getsize(f"{copy}.damaged") == 300
    assert f"moved it to {copy}.damaged" in caplog.text
