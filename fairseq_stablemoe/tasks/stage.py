"""The training-loop side of StableMoE, shared by the LM and translation tasks: the stage switch."""
import logging

from fairseq import metrics

from ..moe import moe_layers, parameter_counts
from ..moe.expert_parallel import (
    check_trainer_setup,
    drop_gathered_experts,
    gather_experts,
    reset_expert_optimizer_state,
    scale_expert_gradients,
    sharded_layers,
)
from .routing_probes import RoutingProbes

logger = logging.getLogger(__name__)


def staged_routings(model):
    return [layer.routing for layer in moe_layers(model) if hasattr(layer.routing, "enter_stage2")]


def switch_stages(model, update_num: int) -> int:
    """Move every staged routing whose stage 1 is over into stage 2 (once); return how many moved.

    A routing loaded from a stage-2 checkpoint is frozen again, with its saved router, and logged as a resume.
    """
    moved = resumed = 0
    for routing in staged_routings(model):
        if update_num >= routing.stage1_updates and not routing.in_stage2:
            resumed += int(routing.stage) == 2
            moved += int(routing.stage) != 2
            routing.enter_stage2()
    if moved:
        logger.info(f"StableMoE: update {update_num}: {moved} MoE layer(s) enter stage 2; "
                    f"distilled routers frozen, routing fixed from now on")
    if resumed:
        logger.info(f"StableMoE: resumed in stage 2 at update {update_num}: {resumed} MoE layer(s) keep the "
                    f"frozen router saved in the checkpoint")
    return moved


def check_resumed_stage(model, update_num: int):
    """A checkpoint written in stage 2 cannot go back to stage 1 (its router would start moving again)."""
    for routing in staged_routings(model):
        if int(routing.stage) == 2 and update_num < routing.stage1_updates:
            raise ValueError(
                f"this checkpoint was saved in stage 2 but --stage1-updates {routing.stage1_updates} puts "
                f"update {update_num} in stage 1; resume with --stage1-updates <= {update_num}, or restart "
                f"training without --restore-file")


def updates_done():
    """The trainer's update count, which it logs into the active metric aggregators on every update and on
    checkpoint load (not metrics.get_meter("default", ...): loading a checkpoint's metrics replaces that
    object while the trainer keeps logging into the active one). None before any was logged."""
    counts = [agg["num_updates"].val for agg in metrics.get_active_aggregators()
              if "num_updates" in agg and agg["num_updates"].val is not None]
    return int(max(counts)) if counts else None


class StageSwitchingTask:
    """Mix into a fairseq task, before the task class: switches StableMoE stages in the update loop,
    records routing probes (the task config may mix in RoutingProbeConfig) and does the training-loop side
    of expert parallelism (gradient scale, checkpoint gather)."""

    _resume_checked = False
    _routing_probes = None

    def build_model(self, cfg, *args, **kwargs):
        model = super().build_model(cfg, *args, **kwargs)
        model.stage_switching_task = True
        shared, expert, routing = parameter_counts(model)
        logger.info(f"StableMoE: {shared:,} shared parameters, {expert:,} expert parameters, {routing:,} routing "
                    f"parameters ({shared / 1e6:.1f}M + {expert / 1e6:.1f}M + {routing / 1e6:.2f}M = "
                    f"{(shared + expert + routing) / 1e6:.1f}M; --moe-routing {getattr(cfg, 'moe_routing', '?')})")
        sharded = list(sharded_layers(model))
        if sharded:
            scale_expert_gradients(model)
            logger.info(f"StableMoE: expert parallelism over {sharded[0].dispatcher.world} ranks; this rank holds "
                        f"experts {sharded[0].experts.global_ids} of each MoE layer")
        return model

    def build_criterion(self, cfg, *args, **kwargs):
        from ..criterions.moe_aux import MoEAuxLossMixin

        criterion = super().build_criterion(cfg, *args, **kwargs)
        if not isinstance(criterion, MoEAuxLossMixin):
            raise ValueError(
                f"--criterion {cfg._name} ignores the MoE balance and distillation losses; use "
                f"--criterion stablemoe_cross_entropy (LM) or stablemoe_label_smoothed_cross_entropy (translation)")
        return criterion

    @property
    def routing_probes(self):
        if self._routing_probes is None:
            # fairseq's LegacyFairseqTask (language_modeling, translation_multi_simple_epoch) keeps it in .args
            task_cfg = self.cfg if self.cfg is not None else self.args
            self._routing_probes = RoutingProbes.from_task_config(task_cfg) or False
        return self._routing_probes

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        probes = self.routing_probes
        first_step = not self._resume_checked
        if first_step:
            check_resumed_stage(model, update_num)
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
        switch_stages(model, update_num)
        if probes:
            # the first step of a (resumed) run probes too: that is where the record continues
            if first_step or update_num % probes.interval == 0:
                probes.probe(self, model, update_num)
            if probes.latest_change is not None:
                # held between probes, so every log line and tensorboard point has the latest value
                metrics.log_scalar("route_change", probes.latest_change, priority=900, round=4)
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

    def begin_valid_epoch(self, epoch, model):
        """Probe at each validation too, so the record ends at the final update."""
        super().begin_valid_epoch(epoch, model)
        gather_experts(model)  # all ranks validate before fairseq saves; rank 0 then writes every expert
        update = updates_done()
        if self.routing_probes and update is not None:
            switch_stages(model, update)  # what the next train_step does first: the probe sees its routing
            self.routing_probes.probe(self, model, update)
