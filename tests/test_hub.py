"""fairseq's own Python API on trained StableMoE models (from_pretrained, score, sample, translate), and
fairseq-eval-lm on them.

The LM is trained and evaluated with --sample-break-mode eos: fairseq's TokenBlockDataset path that numpy 2
breaks (np.compat), also taken by the hub's score() and sample().
"""
import re

import pytest
import torch
from fairseq.models import MODEL_REGISTRY

import fairseq_stablemoe
from helpers import (
    PLUGIN, WORDS, run_cli, run_fairseq_train, tiny_lm_data, train_lm_args, translate_word, write_parallel_corpus,
)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-lm")
    data = tiny_lm_data(root)
    log = run_fairseq_train(train_lm_args(data, root / "ckpt", "--sample-break-mode", "eos", stage1=5, max_update=10),
                            root / "train.log")
    assert "enter stage 2" in log
    return data, root / "ckpt"


@pytest.mark.slow  # fairseq-eval-lm
def test_eval_lm_with_sample_break_mode_eos(lm):
    data, ckpt = lm
    out = run_cli("fairseq_cli.eval_lm", [data, "--user-dir", PLUGIN, "--task", "stablemoe_language_modeling",
                                          "--path", ckpt / "checkpoint_best.pt", "--tokens-per-sample", 32,
                                          "--sample-break-mode", "eos", "--gen-subset", "test", "--cpu",
                                          "--num-workers", 0])
    # every test sentence is one sample: 20 sentences of 4..24 words + </s>
    assert re.search(r"Evaluated (\d+) tokens", out) and int(re.search(r"Evaluated (\d+) tokens", out)[1]) > 100
    assert re.search(r"Perplexity: \d+\.\d+", out)


@pytest.mark.slow  # fairseq-eval-lm
def test_eval_lm_that_would_score_no_token_is_an_error(lm):
    data, ckpt = lm  # trained with --tokens-per-sample 32: the model has 32 positions
    with pytest.raises(RuntimeError, match=r"longer than the model's 32 positions .*pass --tokens-per-sample 32"):
        run_cli("fairseq_cli.eval_lm", [data, "--user-dir", PLUGIN, "--task", "stablemoe_language_modeling",
                                        "--path", ckpt / "checkpoint_best.pt", "--tokens-per-sample", 64,
                                        "--gen-subset", "test", "--cpu", "--num-workers", 0])


def test_skipping_most_tokens_is_an_error(caplog):
    from types import SimpleNamespace

    import numpy as np

    from fairseq_stablemoe.tasks.skipped_samples import check_coverage

    class Sizes:
        num_tokens_vec = staticmethod(lambda indices: np.full(len(indices), 10))

    lm = SimpleNamespace(args=SimpleNamespace(tokens_per_sample=1024, sample_break_mode="none"))
    check_coverage(lm, Sizes, np.arange(100), np.arange(100), 128)
    assert not caplog.records
    with pytest.raises(ValueError, match=r"only 400 of the split's 1,000 tokens \(40.0%\) would be scored: 60 of "
                                         r"100 samples are longer than the model's 128 positions .*pass "
                                         r"--tokens-per-sample 128"):
        check_coverage(lm, Sizes, np.arange(100), np.arange(40), 128)


def test_package_exports_models_and_advertises_no_downloads():
    assert MODEL_REGISTRY["stablemoe_lm"] is fairseq_stablemoe.StableMoELanguageModel
    assert MODEL_REGISTRY["stablemoe_transformer"] is fairseq_stablemoe.StableMoETransformerModel
    assert fairseq_stablemoe.StableMoELanguageModel.hub_models() == {}
    assert fairseq_stablemoe.StableMoETransformerModel.hub_models() == {}


def test_lm_from_pretrained_score_and_sample(lm):
    data, ckpt = lm
    hub = MODEL_REGISTRY["stablemoe_lm"].from_pretrained(str(ckpt), "checkpoint_best.pt", data_name_or_path=data)
    hub.eval()
    model, dictionary = hub.models[0], hub.task.target_dictionary
    sentence = "w1 w2 w3 w4 w5"

    scored = hub.score(sentence)
    tokens = dictionary.encode_line(sentence, add_if_not_exist=False, append_eos=False).long()
    prev = torch.cat([tokens.new([dictionary.eos()]), tokens[:-1]])[None]
    with torch.no_grad():
        lprobs = model.get_normalized_probs(model(prev), log_probs=True)[0]
    assert torch.equal(scored["tokens"], tokens)
    torch.testing.assert_close(scored["positional_scores"], lprobs.gather(1, tokens[:, None])[:, 0],
                               atol=1e-5, rtol=0)

    # sample() with beam 1 and no sampling is greedy: each word it adds is the model's argmax
    words = hub.sample("w1 w2", beam=1, max_len_b=6).split()
    assert words[:2] == ["w1", "w2"] and len(words) > 2
    for i in range(2, len(words)):
        prev = dictionary.encode_line(" ".join(words[:i]), add_if_not_exist=False, append_eos=False).long()
        with torch.no_grad():
            logits = model(torch.cat([prev.new([dictionary.eos()]), prev])[None])[0][0, -1]
        logits[dictionary.pad()] = float("-inf")
        assert dictionary[int(logits.argmax())] == words[i]

MT_TASK = ["--task", "stablemoe_translation_multi_simple_epoch", "--langs", "xx,en", "--lang-pairs", "xx-en,en-xx",
           "--encoder-langtok", "src", "--decoder-langtok"]


@pytest.fixture(scope="module")
def mt(tmp_path_factory):
    """A tiny xx<->en model (xx: English words reversed), trained for 40 updates across the stage switch."""
    root = tmp_path_factory.mktemp("hub-mt")
    raw = write_parallel_corpus(root / "raw", langs=("xx",), sizes=(("train", 200), ("valid", 8), ("test", 6)))
    run_cli("fairseq_cli.preprocess", [
        "-s", "xx", "-t", "en", "--joined-dictionary", "--destdir", root / "bin", "--workers", 1,
        *[a for split in ("train", "valid", "test") for a in (f"--{split}pref", raw / "xx-en" / split)]])
    run_fairseq_train([
        root / "bin", "--user-dir", PLUGIN, *MT_TASK, "--arch", "stablemoe_transformer_tiny",
        "--share-all-embeddings", "--moe-experts", 4, "--moe-sublayers", 1,
        "--criterion", "stablemoe_label_smoothed_cross_entropy", "--stage1-updates", 10, "--max-update", 40,
        "--optimizer", "adam", "--lr", 5e-3, "--max-tokens", 1500, "--cpu", "--save-dir", root / "ckpt",
        "--no-epoch-checkpoints", "--save-interval", 1000, "--validate-interval", 1000, "--seed", 1,
        "--num-workers", 0], root / "train.log")
    return root


def load_mt(root, **languages):
    return MODEL_REGISTRY["stablemoe_transformer"].from_pretrained(
        str(root / "ckpt"), "checkpoint_last.pt", data_name_or_path=str(root / "bin"), **languages)


@pytest.mark.slow  # the fixture trains; fairseq-generate
def test_translate_both_directions_of_a_multilingual_model(mt):
    sources = (mt / "raw" / "xx-en" / "test.xx").read_text().split("\n")[:6]
    # fairseq-generate's greedy translations of the same sentences
    out = run_cli("fairseq_cli.generate", [
        mt / "bin", "--user-dir", PLUGIN, *MT_TASK, "-s", "xx", "-t", "en",
        "--path", mt / "ckpt" / "checkpoint_last.pt", "--gen-subset", "test", "--beam", 1,
        "--batch-size", 8, "--required-batch-size-multiple", 1, "--cpu"])
    generated = {int(i): hyp for i, hyp in re.findall(r"^H-(\d+)\t\S+\t(.*)$", out, re.M)}
    assert len(generated) == 6

    to_en = load_mt(mt, source_lang="xx", target_lang="en").translate(sources, beam=1)
    assert to_en == [generated[i] for i in range(6)]  # the same language tags as fairseq-generate, none shown
    to_xx = load_mt(mt, source_lang="en", target_lang="xx").translate(to_en, beam=1)
    english, xx = set(WORDS), {translate_word(w, "xx") for w in WORDS}
    assert all(words and set(words) <= english for words in map(str.split, to_en))
    assert all(words and set(words) <= xx for words in map(str.split, to_xx))


@pytest.mark.slow  # the fixture trains
def test_multilingual_model_needs_a_direction(mt):
    with pytest.raises(ValueError, match="pass target_lang=... to from_pretrained"):
        load_mt(mt, source_lang="xx")
    with pytest.raises(ValueError, match=r"pass source_lang=... and target_lang=... to from_pretrained .*: xx, en"):
        load_mt(mt)
