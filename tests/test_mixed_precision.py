"""bf16 training through the path that works: fairseq-hydra-train with common.bf16=true (fairseq-train's command
line turns --bf16 into --tpu). It runs on CPU too: through the stage switch, the frozen router bit-identical,
routing and losses in float32."""
import os

import pytest
import torch

import fairseq_stablemoe  # noqa: F401  (registers the plugin for in-process loading)
from helpers import PLUGIN, run_cli, saved_stage, tiny_lm_data

STAGE1, MAX_UPDATE = 3, 6


def write_hydra_config(directory, data, save_dir, cpu=True, stage1=STAGE1, max_update=MAX_UPDATE):
    """A fairseq-hydra-train config for the tiny LM of helpers.train_lm_args; returns its name."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "tiny_lm.yaml"), "w") as f:
        f.write(f"""# @package _group_
common: {{user_dir: {PLUGIN}, cpu: {str(cpu).lower()}, log_format: simple, log_interval: 1, seed: 1}}
task: {{_name: stablemoe_language_modeling, data: {data}, tokens_per_sample: 32}}
model: {{_name: stablemoe_lm_tiny, decoder_layers: 2, decoder_embed_dim: 32, decoder_ffn_embed_dim: 64,
        decoder_attention_heads: 2, moe_experts: 4, moe_sublayers: 1, stage1_updates: {stage1}}}
criterion: {{_name: stablemoe_cross_entropy}}
optimizer: {{_name: adam}}
lr_scheduler: {{_name: fixed}}
optimization: {{lr: [0.003], max_update: {max_update}}}
dataset: {{batch_size: 4, num_workers: 0}}
checkpoint: {{save_dir: {save_dir}, save_interval_updates: {stage1}, no_epoch_checkpoints: true}}
""")
    return "tiny_lm"


def train_bf16(tmp_path, data, *overrides, cpu=True):
    """fairseq-hydra-train in bf16; returns (log, checkpoint at the switch, last checkpoint) as loaded states."""
    save_dir = tmp_path / "ckpt"
    name = write_hydra_config(tmp_path / "config", data, save_dir, cpu=cpu)
    log = run_cli("fairseq_cli.hydra_train", ["--config-dir", tmp_path / "config", "--config-name", name,
                                              "common.bf16=true", *overrides], cwd=tmp_path)
    load = lambda u: torch.load(save_dir / f"checkpoint_1_{u}.pt", weights_only=True)  # noqa: E731
    return log, load(STAGE1), load(MAX_UPDATE)


def check_bf16_run(log, at_switch, end):
    assert end["cfg"]["common"]["bf16"] and not end["cfg"]["common"]["tpu"]
    assert log.count("enter stage 2") == 1 and "loss_scale=" not in log  # bf16: no loss scaler
    assert "balance_loss=nan" not in log and "loss=nan" not in log
    assert saved_stage(at_switch["model"]) == 1
    assert saved_stage(end["model"]) == 2
    for key, value in end["model"].items():
        if key.endswith("ff1.weight"):  # the model trained in bf16 (fp32 master weights in the optimizer)
            assert torch.equal(value.bfloat16().float(), value), key
        if ".distilled_router." in key and not key.endswith("table"):
            assert torch.equal(at_switch["model"][key], value), key  # frozen: bit-identical
    centroids = "decoder.layers.1.routing.centroids"
    assert not torch.equal(at_switch["model"][centroids], end["model"][centroids])  # the gate kept learning


def routing_in_bf16_model(checkpoint_path, training):
    """The checkpoint's model cast to bf16 (as the trainer casts it) and run: its routing."""
    from fairseq import checkpoint_utils

    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(checkpoint_path)])
    model = models[0].to(torch.bfloat16).train(training)
    captured = []
    model.moe_layers()[0].routing.register_forward_hook(lambda m, i, out: captured.append(out))
    tokens = 4 + torch.arange(64).view(2, 32) % (len(task.dictionary) - 4)
    model(tokens)
    return captured[0], model, tokens


@pytest.mark.slow  # fairseq-hydra-train
@pytest.mark.parametrize("optimizer", ["bf16", "memory_efficient_bf16"])
def test_bf16_through_hydra_trains_across_the_switch(tmp_path, optimizer):
    data = tiny_lm_data(tmp_path)
    extra = ["common.memory_efficient_bf16=true"] if optimizer == "memory_efficient_bf16" else []
    log, at_switch, end = train_bf16(tmp_path, data, *extra)
    check_bf16_run(log, at_switch, end)

    stage1, _, _ = routing_in_bf16_model(tmp_path / "ckpt" / f"checkpoint_1_{STAGE1}.pt", training=True)
    assert stage1.gate.dtype == torch.float32 and stage1.losses
    assert all(v.dtype == torch.float32 for v in stage1.losses.values())
    stage2, model, tokens = routing_in_bf16_model(tmp_path / "ckpt" / f"checkpoint_1_{MAX_UPDATE}.pt",
                                                  training=False)  # inference routes with the frozen router
    assert stage2.gate.dtype == torch.float32
    router = model.moe_layers()[0].routing.distilled_router
    assert torch.equal(stage2.expert, router.table[tokens].t().reshape(-1))  # the frozen table routes
