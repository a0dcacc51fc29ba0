"""`MoETask`, mixed into our tasks: fairseq's task hooks, each handing its moment of the training loop to the
module whose job it is (the stage: stage.py; checks: training_checks.py; routing probes, --stage1-updates auto,
the expert-load record; expert parallelism: moe/expert_parallel.py)."""
import logging

from fairseq import metrics, utils

from ..legacy_optimizer_state import convert_when_loaded
from ..moe import comm, moe_layers, parameter_counts
from ..moe.expert_parallel import drop_gathered_experts, gather_experts, scale_expert_gradients, sharded_layers
from ..options import option, task_config, task_option
from ..checks.resume_checks import resume_path
from .expert_load_record import ExpertLoadRecord
from .routing_probes import RoutingProbes
from .stage import advance_stages, end_stage1_when_settled, staged_routings, warn_stage_schedule
from .stage1_auto import Stage1Auto
from .training_checks import check_criterion, check_first_step

logger = logging.getLogger(__name__)


def updates_done():
    """The trainer's update count, which it logs into the active metric aggregators on every update and on
    checkpoint load (not metrics.get_meter("default", ...): loading a checkpoint's metrics replaces that
    object while the trainer keeps logging into the active one). None before any was logged."""
    counts = [agg["num_updates"].val for agg in metrics.get_active_aggregators()
              if "num_updates" in agg and agg["num_updates"].val is not None]
    return int(max(counts)) if counts else None


class MoETask:
    """Mix into a fairseq task, before the task class: the training loop's hooks for MoE models (the stage switch,
    checks before the first update, routing probes, --stage1-updates auto, the expert-load record at validation,
    expert parallelism's gradient scale and checkpoint gather).

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
        model.moe_task = True
        shared, expert, routing = parameter_counts(model)
        logger.info(f"--moe-routing {option(cfg, 'moe_routing', '?')}: {shared:,} shared parameters, "
                    f"{expert:,} expert parameters, {routing:,} routing parameters ({shared / 1e6:.1f}M + {expert / 1e6:.1f}M + "
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
        check_criterion(criterion, cfg)
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
            check_first_step(model, optimizer, update_num, probes)
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
            end_stage1_when_settled(model, self._stage1_auto, probes, update_num)
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


    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        if self._stage1_auto is not None and not self._validating and logging_outputs:
            self._stage1_auto.count(utils.item(sum(log.get("moe_distill_agree", 0) for log in logging_outputs)),
                                    utils.item(sum(log.get("moe_tokens", 0) for log in logging_outputs)))
