"""The hydra configs shipped in fairseq_stablemoe/config: the paper's archs, spelled out, and a tiny one that
fairseq-hydra-train trains through the stage switch."""
import os
import subprocess
import sys

import pytest
from fairseq import options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf, merge_with_parent
from omegaconf import OmegaConf

from fairseq_stablemoe.models.stablemoe_lm import StableMoELanguageModelConfig
from helpers import PLUGIN, ROOT, tiny_lm_data

CONFIGS = os.path.join(PLUGIN, "config")


def yaml_model(name):
    model = OmegaConf.load(os.path.join(CONFIGS, f"{name}.yaml")).model
    return OmegaConf.to_container(merge_with_parent(StableMoELanguageModelConfig(), model), resolve=False)


def arch_model(arch):
    args = options.parse_args_and_arch(options.get_training_parser(), [
        "data", "--user-dir", PLUGIN, "--task", "stablemoe_language_modeling", "--arch", arch])
    return OmegaConf.to_container(convert_namespace_to_omegaconf(args).model, resolve=True)


# what each config sets on purpose beyond its arch: the capacity factor of the authors' command, the demo's stage 1
@pytest.mark.parametrize("name, arch, deliberate", [
    ("stablemoe_lm_base", "stablemoe_lm_base", {"capacity_factor": 2.0}),
    ("stablemoe_lm_large", "stablemoe_lm_large", {"capacity_factor": 2.0}),
    ("stablemoe_lm_tiny", "stablemoe_lm_tiny", {"stage1_updates": "50"}),
])
def test_config_is_the_arch(name, arch, deliberate):
    from_yaml, from_arch = yaml_model(name), arch_model(arch)
    for field in StableMoELanguageModelConfig.__dataclass_fields__:
        if field.startswith("_") or field == "base_shuffle" or str(from_yaml[field]).startswith("${"):
            # base_shuffle: fairseq's own BASE layers, off (base_layers = 0) in every StableMoE model
            continue  # interpolations of other settings (e.g. model.decoder_input_dim: ${model.decoder_embed_dim})
        expected = deliberate.get(field, from_arch.get(field))
        assert from_yaml[field] == expected, f"{name}.yaml: model.{field} = {from_yaml[field]}, {arch} has {expected}"


def test_paper_configs_train_512k_token_batches():
    for name in ("stablemoe_lm_base", "stablemoe_lm_large"):
        cfg = OmegaConf.load(os.path.join(CONFIGS, f"{name}.yaml"))
        tokens = (cfg.distributed_training.distributed_world_size * cfg.dataset.batch_size
                  * cfg.task.tokens_per_sample * cfg.optimization.update_freq[0])
        assert tokens == 512 * 1024 and cfg.optimization.max_update == 60000 and cfg.model.stage1_updates == 6000


@pytest.mark.slow  # fairseq-hydra-train
def test_tiny_config_trains_through_the_stage_switch(tmp_path):
    tiny_lm_data(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([
        sys.executable, "-c", "from fairseq_cli.hydra_train import cli_main; cli_main()",
        "--config-dir", CONFIGS, "--config-name", "stablemoe_lm_tiny",
        "task.data=bin", f"common.user_dir={PLUGIN}", "checkpoint.save_dir=ckpt",  # relative to the cwd
        "optimization.max_update=6", "model.stage1_updates=3", "task.tokens_per_sample=32", "common.log_interval=1",
    ], cwd=tmp_path, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "update 3: 1 MoE layer(s) enter stage 2" in out
    assert "stage=1" in out and "stage=2" in out and "num_updates=6" in out
    assert (tmp_path / "ckpt" / "checkpoint_last.pt").exists() and not (tmp_path / "outputs").exists()
    # hydra's own record goes beside the checkpoints, not into the working folder
    assert not (tmp_path / ".hydra").exists() and not (tmp_path / "hydra_train.log").exists()
    assert (tmp_path / "ckpt" / ".hydra" / "config.yaml").exists()
    assert "num_updates=6" in (tmp_path / "ckpt" / "hydra_train.log").read_text()
