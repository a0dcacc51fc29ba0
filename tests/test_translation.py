"""stablemoe_transformer: routing inputs, incremental decoding, and training + fairseq-generate end to end."""
import argparse
import re

import pytest
import torch
from fairseq.sequence_generator import SequenceGenerator

from fairseq_stablemoe.models.stablemoe_transformer import StableMoETransformerModel, stablemoe_transformer_tiny
from fairseq_stablemoe.moe import DecoderMoELayer, EncoderMoELayer, moe_layers
from fairseq_stablemoe.moe.routing import ROUTINGS

from helpers import PLUGIN, make_dictionary, run_cli, write_parallel_corpus


def build_model(dictionary, router="wordemb", **overrides):
    args = argparse.Namespace(distilled_router=router, moe_experts=4, moe_sublayers=1, dropout=0.0,
                              share_all_embeddings=True, **overrides)
    stablemoe_transformer_tiny(args)
    task = argparse.Namespace(source_dictionary=dictionary, target_dictionary=dictionary)
    torch.manual_seed(0)
    model = StableMoETransformerModel.build_model(args, task)
    for layer in moe_layers(model):  # experts start as the identity: make them matter
        for p in layer.experts.parameters():
            torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def test_placement_after_middle_block_and_alignment_from_last_block():
    model = build_model(make_dictionary(), encoder_layers=4, decoder_layers=4)
    enc, dec = model.encoder.layers, model.decoder.layers
    assert [type(m) for m in enc].index(EncoderMoELayer) == 2 and len(enc) == 5
    assert [type(m) for m in dec].index(DecoderMoELayer) == 2 and len(dec) == 5
    assert not isinstance(dec[model.decoder.num_layers - 1], DecoderMoELayer)  # alignment layer: last real block
    top = build_model(make_dictionary(), decoder_moe_position="top")
    assert isinstance(top.decoder.layers[-1], DecoderMoELayer)
    assert top.decoder.num_layers - 1 == len(top.decoder.layers) - 2


def test_bad_layer_count_names_the_flag():
    with pytest.raises(ValueError, match="--decoder-moe-layers"):
        build_model(make_dictionary(), decoder_moe_layers=3)


@pytest.mark.parametrize("routing", sorted(ROUTINGS))
def test_every_routing_trains_in_both_stacks(routing):
    d = make_dictionary()
    model = build_model(d, moe_routing=routing)  # base needs fairseq's libbase, which `make` builds
    model.train()
    model.moe_task = True
    src, prev = torch.tensor([[12, 13, 14, d.eos()]] * 2), torch.tensor([[d.eos(), 30, 31, 32]] * 2)
    out, extra = model(src, torch.tensor([4, 4]), prev)
    out.sum().backward()
    assert list(extra["moe_aux"]) == list(moe_layers(model))  # the encoder's MoE layers, then the decoder's
    for layer in moe_layers(model):
        assert extra["moe_aux"][layer]["tokens"] == 8
        assert any(p.grad is not None for p in layer.experts.parameters())


def test_encoder_routes_by_source_ids_decoder_by_target_input_ids():
    d = make_dictionary()
    model = build_model(d)
    seen = {}

    def dump(name):
        def hook(routing, args, out):
            seen[name] = (args[1].ids(), out.expert)
        return hook

    for layer in moe_layers(model):
        layer.routing.register_forward_hook(dump(type(layer).__name__))
    pad, eos = d.pad(), d.eos()
    # left-padded source with a language tag, target-side input: disjoint id ranges
    src = torch.tensor([[pad, pad, 10, 11, 12, eos], [20, 21, 22, 23, 24, eos]])
    prev = torch.tensor([[eos, 30, 31, 32, pad], [eos, 33, 34, 35, 36]])
    model(src, torch.tensor([4, 6]), prev)

    enc_ids, enc_expert = seen["EncoderMoELayer"]
    dec_ids, dec_expert = seen["DecoderMoELayer"]
    time_major = lambda t: t.t().reshape(-1)[t.t().reshape(-1) != pad]  # noqa: E731
    assert torch.equal(enc_ids, time_major(src))
    assert torch.equal(dec_ids, time_major(prev))
    # and each token goes where the distilled router sends its id (evaluation routes as stage 2)
    for layer, ids, expert in ((model.encoder.layers[1], enc_ids, enc_expert),
                               (model.decoder.layers[1], dec_ids, dec_expert)):
        router = layer.routing.distilled_router
        assert torch.equal(expert, router.route(ids[None], ids.numel())[0])


def forced_scores(model, src, src_len, hyp, eos):
    prev = torch.cat([torch.tensor([eos]), hyp[:-1]])[None]
    lprobs = model.get_normalized_probs(model(src, src_len, prev), log_probs=True)
    return lprobs[0].gather(1, hyp[:, None]).squeeze(1)


@pytest.mark.parametrize("router", ["wordemb", "cnn", "bigram", "transformer"])
def test_incremental_decoding_equals_full_sequence(router):
    d = make_dictionary()
    model = build_model(d, router)
    for layer in moe_layers(model):
        layer.routing.end_stage1(0)
    src = torch.tensor([[d.pad(), 12, 13, 14, 15, d.eos()], [20, 21, 22, 23, 24, d.eos()]])
    src_len = torch.tensor([5, 6])
    prev = torch.tensor([[d.eos(), 30, 31, 30, 33, 31, 32], [d.eos(), 31, 30, 30, 34, 35, 36]])

    decoder = model.decoder
    router_module = decoder.layers[1].routing.distilled_router
    if router != "wordemb":  # the routing must depend on earlier tokens, or this test proves nothing
        assert not torch.equal(router_module.route(prev, prev.size(1)),
                               router_module.route(prev.reshape(-1, 1), 1).view_as(prev))
    with torch.no_grad():
        enc = model.encoder(src, src_lengths=src_len)
        full, _ = decoder(prev, encoder_out=enc)
        state = {}
        steps = [decoder(prev[:, :t], encoder_out=enc, incremental_state=state)[0][:, -1]
                 for t in range(1, prev.size(1) + 1)]
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=0)

    for beam in (1, 3):
        generator = SequenceGenerator([model], d, beam_size=beam, max_len_b=8, min_len=3)
        with torch.no_grad():
            hypos = generator.forward({"net_input": {"src_tokens": src, "src_lengths": src_len}})
            for i, nbest in enumerate(hypos):
                for hypo in nbest:
                    forced = forced_scores(model, src[i:i + 1], src_len[i:i + 1], hypo["tokens"], d.eos())
                    torch.testing.assert_close(hypo["positional_scores"], forced, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_train_through_stage_switch_then_generate_with_sacrebleu(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one thread is much faster on a busy CPU
    raw = write_parallel_corpus(tmp_path / "raw", langs=("xx",), sizes=(("train", 200), ("valid", 16), ("test", 13)))
    run_cli("fairseq_cli.preprocess", [
        "-s", "xx", "-t", "en", "--joined-dictionary", "--destdir", tmp_path / "bin", "--workers", 1,
        *[a for split in ("train", "valid", "test") for a in (f"--{split}pref", raw / "xx-en" / split)]])
    task = ["--user-dir", PLUGIN, "--task", "stablemoe_translation_multi_simple_epoch", "--langs", "xx,en",
            "--lang-pairs", "xx-en,en-xx", "--encoder-langtok", "src", "--decoder-langtok"]
    train_log = run_cli("fairseq_cli.train", [
        tmp_path / "bin", *task, "--arch", "stablemoe_transformer_tiny", "--share-all-embeddings",
        "--moe-experts", 4, "--moe-sublayers", 1, "--criterion", "stablemoe_label_smoothed_cross_entropy",
        "--label-smoothing", 0.1, "--stage1-updates", 6, "--max-update", 12, "--optimizer", "adam", "--lr", 3e-3,
        "--max-tokens", 1500, "--cpu", "--save-dir", tmp_path / "ckpt", "--no-epoch-checkpoints",
        "--save-interval", 1000, "--validate-interval", 1000, "--seed", 1, "--log-format", "simple",
        "--num-workers", 0, "--routing-probe-interval", 4])
    assert "update 6: 2 MoE layer(s) enter stage 2" in train_log
    valid = [line for line in train_log.split("\n") if "valid on 'valid' subset" in line][-1]
    assert re.search(r"lang_experts_enc (xx|en):\d", valid) and "lang_overlap_dec" in valid
    assert (tmp_path / "ckpt" / "routing_probes.pt").exists()

    out = run_cli("fairseq_cli.generate", [
        tmp_path / "bin", *task, "-s", "xx", "-t", "en", "--path", tmp_path / "ckpt" / "checkpoint_last.pt",
        "--gen-subset", "test", "--beam", 3, "--batch-size", 8, "--required-batch-size-multiple", 1, "--cpu",
        "--scoring", "sacrebleu"])
    assert len(re.findall(r"^H-\d+\t", out, re.M)) == 13
    assert re.search(r"Generate test with beam=3: BLEU = \d+\.\d+", out)
