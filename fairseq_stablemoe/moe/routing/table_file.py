"""--hash-type file: the token -> expert table a StableMoE run froze, read from its checkpoint.

The file is loaded as the checkpoints module loads any checkpoint: refused if truncated or if it pickles anything
but tensors and fairseq's settings, so reading it cannot run code. The table is the word-embedding distilled
router's (`...routing.distilled_router.table`), which StableMoE fills when stage 2 begins.
"""
import os

import torch

TABLE_SUFFIX = "routing.distilled_router.table"


def read_routing_table(path: str, vocab_size: int, num_experts: int) -> torch.Tensor:
    from ...checkpoints import check_checkpoint

    if not path or not os.path.exists(path):
        raise ValueError(f"--hash-table {path} does not exist: pass a StableMoE checkpoint written in stage 2 (e.g. "
                         f"its checkpoint_last.pt); to evaluate a model trained with it without the file, add "
                         f"--model-overrides \"{{'hash_type': 'random', 'hash_table': None}}\" (the checkpoint "
                         f"carries its table)")
    check_checkpoint(path, flag="--hash-table")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = state.get("model", {}) if isinstance(state, dict) else {}
    tables = [value for key, value in model.items() if key.endswith(TABLE_SUFFIX)]
    if len(tables) != 1:
        raise ValueError(f"--hash-table {path} holds {len(tables)} distilled-router tables ({TABLE_SUFFIX}); pass "
                         f"a checkpoint of a StableMoE model with one MoE layer and --distilled-router wordemb")
    table = tables[0]
    if table.dtype != torch.long or table.dim() != 1 or table.numel() != vocab_size:
        raise ValueError(f"--hash-table {path}: the table covers {table.numel()} token ids ({table.dtype}) but this "
                         f"model's dictionary has {vocab_size}: use a checkpoint trained on the same data directory")
    if bool((table < 0).any()):
        raise ValueError(f"--hash-table {path} was written in stage 1 (its table is not built yet): pass a "
                         f"checkpoint saved after --stage1-updates")
    if bool((table >= num_experts).any()):
        raise ValueError(f"--hash-table {path} routes to expert {int(table.max())} but --moe-experts is "
                         f"{num_experts}: use the --moe-experts of the run that wrote it")
    return table.clone()
