"""stablemoe_lm built in-process: placement, incremental decoding, losses summed over layers."""
import pytest
import torch

from fairseq_stablemoe.criterions.moe_aux import collect_moe_aux
from fairseq_stablemoe.moe import MoELayer
from fairseq_stablemoe.moe.placement import insert_positions
from helpers import build_lm


def test_insert_positions_follow_paper_table4():
    assert insert_positions(12, 1, "middle") == [6]  # after block L/2
    assert insert_positions(12, 1, "top") == [12] and insert_positions(12, 1, "bottom") == [0]
    assert insert_positions(12, 3, "scattered") == [3, 6, 9]  # after L/4, 2L/4, 3L/4
    assert insert_positions(12, 2, "middle") == [6, 6]  # stacked


@pytest.mark.parametrize("position,expected", [("middle", [1]), ("top", [2]), ("bottom", [0]), ("scattered", [1])])
def test_model_places_moe_layers(tmp_path, position, expected):
    model, _ = build_lm(tmp_path, "--moe-position", position)
    kinds = [isinstance(layer, MoELayer) for layer in model.decoder.layers]
    assert [i for i, is_moe in enumerate(kinds) if is_moe] == expected and len(kinds) == 3


@pytest.mark.parametrize("router", ["wordemb", "cnn", "bigram"])
def test_incremental_decoding_equals_full_forward(tmp_path, router):
    torch.manual_seed(0)
    model, task = build_lm(tmp_path, "--distilled-router", router)
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # experts and routers away from their (identity) init
        tokens = torch.randint(4, len(task.dictionary), (3, 9))
        full = model(tokens)[0]
        state = {}
        steps = [model.decoder.forward(tokens[:, : t + 1], incremental_state=state)[0] for t in range(9)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_losses_and_statistics_sum_over_all_moe_layers(tmp_path):
    model, task = build_lm(tmp_path, "--moe-layers", 2, "--moe-position", "scattered")
    model.train()
    model.moe_task = True
    net_output = model(torch.randint(4, len(task.dictionary), (2, 8)))
    layers = model.moe_layers()
    aux = collect_moe_aux(model, net_output)
    per_layer = net_output[1]["moe_aux"]
    assert len(layers) == 2 and list(per_layer) == layers
    for key in ("balance_loss", "distill_loss", "tokens"):
        assert torch.allclose(aux[key].float(), (per_layer[layers[0]][key] + per_layer[layers[1]][key]).float())
    assert aux["tokens"].item() == 2 * 16 and aux["forwards"].item() == 2
