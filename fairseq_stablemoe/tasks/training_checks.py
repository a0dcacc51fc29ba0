"""What the training loop refuses or warns about before its first update (and at set-up): a criterion without the MoE
losses, fairseq's flattened fp16 optimizer, a resumed stage-2 checkpoint in stage 1, the trainer's expert-parallel
set-up, probes that would hang with several sharded layers, and experts' optimizer state that cannot survive."""
import logging

from ..criterions.moe_aux import MoEAuxLossMixin
from ..moe.expert_parallel import check_trainer_setup, reset_expert_optimizer_state, sharded_layers
from .stage import check_resumed_stage

logger = logging.getLogger(__name__)


def check_criterion(criterion, cfg):
    if not isinstance(criterion, MoEAuxLossMixin):
        raise ValueError(
            f"--criterion {cfg._name} ignores the MoE balance and distillation losses; use "
            f"--criterion stablemoe_cross_entropy (LM) or stablemoe_label_smoothed_cross_entropy (translation)")


def check_optimizer(optimizer):
    """fairseq's flattened fp16/bf16 optimizer keeps one fp32 copy of all parameters built at the start: it
    misplaces gradients once the distilled router is frozen and copies momentum updates back into it."""
    if getattr(optimizer, "has_flat_params", False):
        raise ValueError(
            "--fp16 flattens all parameters into one fp32 copy, which moves StableMoE's frozen distilled router "
            "in stage 2: add --fp16-no-flatten-grads (or use --memory-efficient-fp16)")


def check_first_step(model, optimizer, update_num: int, probes):
    """Before the first update of a run (fresh or resumed)."""
    check_resumed_stage(model, update_num)
    check_optimizer(optimizer)
    check_trainer_setup(model, optimizer)
    if probes and len(list(sharded_layers(model))) > 1:
        # rank 0 probes alone; a second MoE layer would wait in an all-to-all the others never join
        raise ValueError("--routing-probe-interval with expert parallelism works with one MoE layer; "
                         "with several, add --moe-expert-parallel off")
    if reset_expert_optimizer_state(optimizer, model):
        logger.warning("StableMoE: resuming with expert parallelism: the experts' optimizer state "
                       "(e.g. Adam moments) starts afresh; shared parameters keep theirs")
