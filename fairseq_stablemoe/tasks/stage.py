"""The training-loop side of StableMoE, shared by the LM and translation tasks: the stage-switch log line (the
stage itself is the routing's own), resume and optimizer checks, routing probes, expert-parallel gathering."""
import logging

from fairseq import metrics, utils

from ..resume_checks import resume_path
from ..legacy_optimizer_state import convert_when_loaded
from ..criterions.moe_aux import MoEAuxLossMixin
from ..moe import comm, moe_layers, parameter_counts
from ..options import option, task_config, task_option
from ..moe.expert_parallel import (
    check_trainer_setup,
    drop_gathered_experts,
    gather_experts,
    reset_expert_optimizer_state,
    scale_expert_gradients,
    sharded_layers,
)
from .expert_load_record import ExpertLoadRecord
from .routing_probes import RoutingProbes
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


def check_optimizer(optimizer):
    """fairseq's flattened fp16/bf16 optimizer keeps one fp32 copy of all parameters built at the start: it
    misplaces gradients once the distilled router is frozen and copies momentum updates back into it."""
    if getattr(optimizer, "has_flat_params", False):
        raise ValueError(
            "--fp16 flattens all parameters into one fp32 copy, which moves StableMoE's frozen distilled router "
            "in stage 2: add --fp16-no-flatten-grads (or use --memory-efficient-fp16)")


def updates_done():
    """The trainer's update count, which it logs into the active metric aggregators on every update and on
    checkpoint load (not metrics.get_meter("default", ...): loading a checkpoint's metrics replaces that
    object while the trainer keeps logging into the active one). None before any was logged."""
    counts = [agg["num_updates"].val for agg in metrics.get_active_aggregators()
              if "num_updates" in agg and agg["num_updates"].val is not None]
    return int(max(counts)) if counts else None


class StageSwitchingTask:
    """Mix into a fairseq task, before the task class: logs the StableMoE stage switch (the routings decide it from
    the update count), checks the optimizer and the resumed stage, records routing probes (the task config may mix in RoutingProbeConfig) and does the training-loop side
    of expert parallelism (gradient scale, checkpoint gather).

    The task reads three training options through its config (save_dir, restore_file, max_update: see
    StableMoELanguageModelingConfig; legacy argparse tasks have them in their args).
    """

    _resume_checked = False
    _routing_probes = None
    _expert_loads = None
    _stage1_auto = None  # the --stage1-updates auto decision, while some routing waits for it
    _validating = False
    _validations = (None, 0)  # (update, validation subsets done at that update)

    def build_model(self, cfg, from_checkpoint=False):  # fairseq looks for `from_checkpoint` by name
        model = super().build_model(cfg, from_checkpoint)
        model.stage_switching_task = True
        shared, expert, routing = parameter_counts(model)
        logger.info(f"--moe-routing {option(cfg, 'moe_routing', '?')}: {shared:,} shared parameters, {expert:,} expert "
                    f"parameters, {routing:,} routing parameters ({shared / 1e6:.1f}M + {expert / 1e6:.1f}M + "
                    f"{routing / 1e6:.2f}M = {(shared + expert + routing) / 1e6:.1f}M; fairseq's own 'num. expert "
                    f"model params' line counts only parameters of fairseq's MoE layers, not these)")
        if not from_checkpoint:  # fairseq-train builds a fresh model, then loads the checkpoint it resumes
            self.prepare_training(model)
        sharded = list(sharded_layers(model))
        if sharded:
            scale_expert_gradients(model)
            logger.info(f"StableMoE: expert parallelism over {sharded[0].dispatcher.world} ranks; this rank holds "
                        f"experts {sharded[0].experts.global_ids} of each MoE layer")
        return model

    def prepare_training(self, model):
        max_update = int(task_option(self, "max_update", 0))
        warn_stage_schedule(model, max_update)
        if any(routing.stage1_schedule.auto for routing in staged_routings(model)):
            if not self.routing_probes:
                raise ValueError("--stage1-updates auto decides from the routing probes: add "
                                 "--routing-probe-interval K (e.g. K = 1% of --max-update)")
            self._stage1_auto = Stage1Auto.from_task_config(task_config(self), max_update)
        path = resume_path(self)  # GuardedTask (first among our tasks' bases) has repaired it already
        if path is not None and comm.rank() == 0:
            convert_when_loaded(path, model)

    def build_criterion(self, cfg, *args, **kwargs):
        criterion = super().build_criterion(cfg, *args, **kwargs)
        if not isinstance(criterion, MoEAuxLossMixin):
            raise ValueError(
                f"--criterion {cfg._name} ignores the MoE balance and distillation losses; use "
                f"--criterion stablemoe_cross_entropy (LM) or stablemoe_label_smoothed_cross_entropy (translation)")
        return criterion

    @property
    def routing_probes(self):
        if self._routing_probes is None:
            self._routing_probes = RoutingProbes.from_task_config(task_config(self)) or False
        return self._routing_probes

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        probes = self.routing_probes
        first_step = not self._resume_checked
        if first_step:
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
            self._resume_checked = True
        drop_gathered_experts(model)
        advance_stages(model, update_num, first_step)
        if probes:
            # the first step of a (resumed) run probes too: that is where the record continues
            if first_step or update_num % probes.interval == 0:
                probes.probe(self, model, update_num)
            if probes.latest_change is not None:
                # held between probes, so every log line and tensorboard point has the latest value
                metrics.log_scalar("route_change", probes.latest_change, priority=900, round=4)
        if self._stage1_auto is not None:
            self._end_stage1_when_settled(model, update_num, probes)
        self._validating = False
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

    def begin_valid_epoch(self, epoch, model):
        """Probe at each validation too, so the record ends at the final update."""
        super().begin_valid_epoch(epoch, model)
        self._validating = True
        gather_experts(model)  # all ranks validate before fairseq saves; rank 0 then writes every expert
        update = updates_done()
        if self.routing_probes and update is not None:
            advance_stages(model, update, first_step=False)  # as the next train_step will: the probe sees its routing
            self.routing_probes.probe(self, model, update)

    def post_validate(self, model, stats, agg):
        """fairseq-train calls this after each validation subset: write each expert's load per MoE layer."""
        save_dir = task_option(self, "save_dir")
        if "_moe_expert_load" not in agg or save_dir is None or comm.rank() != 0:
            return
        update = int(stats["num_updates"])
        subset = self._validations[1] if self._validations[0] == update else 0
        self._validations = (update, subset + 1)
        if self._expert_loads is None:
            self._expert_loads = ExpertLoadRecord(save_dir)
        layers = set(moe_layers(model))
        named = [(name, m) for name, m in model.named_modules() if m in layers]
        gate = agg["_moe_gate"].sum if "_moe_gate" in agg else None  # absent: no layer has a soft gate
        self._expert_loads.add(update, subset, [name for name, _ in named], [m.num_experts for _, m in named],
                               agg["_moe_expert_load"].sum, gate)

    def _end_stage1_when_settled(self, model, update_num: int, probes):
        routings = auto_staged_routings(model)
        if not routings:
            return
        why = self._stage1_auto.past_bound(update_num)
        if why is None and update_num > 0 and update_num % probes.interval == 0:
            why = self._stage1_auto.observe(update_num, probes.latest_change if probes.active else None)
            if not Stage1Auto.agree_everywhere(why is not None, next(model.parameters()).device):
                return
            why = why or "rank 0's routing probes found the routing settled"
        if why is not None:
            for routing in routings:
                routing.end_stage1(update_num)
            log_switch(update_num, len(routings), f" (--stage1-updates auto: {why})")

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        if self._stage1_auto is not None and not self._validating and logging_outputs:
            self._stage1_auto.count(utils.item(sum(log.get("moe_distill_agree", 0) for log in logging_outputs)),
                                    utils.item(sum(log.get("moe_tokens", 0) for log in logging_outputs)))
