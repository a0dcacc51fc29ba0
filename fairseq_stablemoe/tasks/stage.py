"""The StableMoE stage in the training loop (the stage itself is each routing's own): passing fairseq's update
count, the stage-switch log line, --stage1-updates auto's end of stage 1, and the checks of a schedule and of a
resumed stage."""
import logging

from ..moe import moe_layers
from .stage1_auto import Stage1Auto

logger = logging.getLogger(__name__)


def staged_routings(model):
    return [layer.routing for layer in moe_layers(model) if layer.routing.staged]


def advance_stages(model, update_num: int, first_step: bool) -> int:
    """Pass fairseq's update count to the model, as fairseq's train_step does first, and log the routings it
    moves into stage 2 (the routings decide); on a resumed run's first step, those the checkpoint had there."""
    routings = staged_routings(model)
    before = [routing.in_stage2 for routing in routings]
    model.set_num_updates(update_num)
    moved = sum(routing.in_stage2 and not was for routing, was in zip(routings, before))
    resumed = sum(was and routing.stage2_began < update_num for routing, was in zip(routings, before)) \
        if first_step else 0
    if moved:
        log_switch(update_num, moved)
    if resumed:
        logger.info(f"StableMoE: resumed in stage 2 at update {update_num}: {resumed} MoE layer(s) keep the "
                    f"frozen router saved in the checkpoint")
    return moved


def log_switch(update_num: int, moved: int, why: str = ""):
    logger.info(f"StableMoE: update {update_num}: {moved} MoE layer(s) enter stage 2; "
                f"distilled routers frozen, routing fixed from now on{why}")


def auto_staged_routings(model):
    """The routings whose stage 1 ends when --stage1-updates auto decides (no fixed length), still in stage 1."""
    return [routing for routing in staged_routings(model) if routing.stage1_schedule.auto and not routing.in_stage2]


def check_resumed_stage(model, update_num: int):
    """A checkpoint written in stage 2 cannot go back to stage 1 (its router would start moving again)."""
    for routing in staged_routings(model):
        schedule = routing.stage1_schedule
        if routing.in_stage2 and not schedule.auto and not schedule.ends_by(update_num):
            raise ValueError(
                f"this checkpoint was saved in stage 2 but --stage1-updates {schedule} puts "
                f"update {update_num} in stage 1; resume with --stage1-updates <= {update_num}, or restart "
                f"training without --restore-file")


def warn_stage_schedule(model, max_update: int) -> None:
    """Legal schedules that are rarely what the user meant: no stage 2, or no stage 1."""
    for routing in staged_routings(model)[:1]:
        schedule = routing.stage1_schedule
        if schedule.auto:
            continue
        if 0 < max_update <= schedule.updates:
            logger.warning(
                f"--stage1-updates {schedule} >= --max-update {max_update}: training stays in "
                f"stage 1 (routing never frozen); the paper uses --stage1-updates = 10% of --max-update")
        elif schedule.updates == 0:
            logger.warning("--stage1-updates 0 skips stage 1: the distilled router is frozen untrained, so routing "
                           "is random and fixed; the paper uses --stage1-updates = 10% of --max-update")


def end_stage1_when_settled(model, stage1_auto: Stage1Auto, probes, update_num: int):
    """--stage1-updates auto: end stage 1 of the routings waiting for it once the probes find the routing settled
    (on every rank alike), or at the schedule's upper bound."""
    routings = auto_staged_routings(model)
    if not routings:
        return
    why = stage1_auto.past_bound(update_num)
    if why is None and update_num > 0 and update_num % probes.interval == 0:
        why = stage1_auto.observe(update_num, probes.latest_change if probes.active else None)
        if not Stage1Auto.agree_everywhere(why is not None, next(model.parameters()).device):
            return
        why = why or "rank 0's routing probes found the routing settled"
    if why is not None:
        for routing in routings:
            routing.end_stage1(update_num)
        log_switch(update_num, len(routings), f" (--stage1-updates auto: {why})")
