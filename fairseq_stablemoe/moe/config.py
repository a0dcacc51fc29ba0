"""The MoE flags shared by every model of the plugin, and their checks."""
import math
from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import ChoiceEnum, FairseqDataclass

from .distilled_router import DISTILLED_ROUTERS
from .routing import ROUTINGS
from .routing.stablemoe import stage1_schedule

MOE_POSITIONS = ChoiceEnum(["middle", "top", "bottom", "scattered"])
EXPERT_PARALLEL_MODES = ChoiceEnum(["auto", "on", "off"])
MOE_ROUTINGS = ChoiceEnum(list(ROUTINGS))
DISTILLED_ROUTER_TYPES = ChoiceEnum(list(DISTILLED_ROUTERS))
HASH_TYPES = ChoiceEnum(["balanced", "random", "file"])
HASH_GATES = ChoiceEnum(["none", "sigmoid"])
STAGE2_GATES = ChoiceEnum(["sigmoid", "one"])
STAGE1_ASSIGNMENTS = ChoiceEnum(["greedy", "balanced"])


@dataclass
class MoELayerConfig(FairseqDataclass):
    """What one MoE layer is: experts, routing, distilled router, capacity, expert parallelism."""

    moe_experts: int = field(default=32, metadata={"help": "experts per MoE layer (N)"})
    moe_sublayers: int = field(default=3, metadata={"help": "pre-LN residual FFN sublayers per expert"})
    moe_ffn_embed_dim: int = field(default=0, metadata={"help": "expert FFN inner size (0 = the model's FFN size)"})
    moe_routing: MOE_ROUTINGS = field(
        default="stablemoe",
        metadata={"help": "routing strategy: stablemoe, the baselines switch, base (BASE layers), hash, or a dense "
                          "control: dense (one expert's FFN stack, FLOP-matched), dense_deeper / dense_wider "
                          "(all experts' parameters in one stack: --moe-experts × the sublayers / FFN size)"})
    hash_type: HASH_TYPES = field(
        default="balanced", metadata={"help": "--moe-routing hash: token -> expert table balanced by the training "
                                              "data's token frequencies (Hash Layers), seeded random, or file: "
                                              "the frozen routing table of a StableMoE checkpoint (--hash-table)"})
    hash_table: Optional[str] = field(
        default=None, metadata={"help": "--hash-type file: a StableMoE checkpoint written in stage 2 with "
                                        "--distilled-router wordemb and the same dictionary; its token -> expert "
                                        "table routes from update 0 (an ablation beyond the paper)"})
    hash_gate: HASH_GATES = field(
        default="none", metadata={"help": "--moe-routing hash: none (Hash Layers: the expert's output as is), or "
                                          "sigmoid: StableMoE's gate σ(E_e·h) on the table's expert e, with learned "
                                          "centroids E (an ablation beyond the paper)"})
    stage2_gate: STAGE2_GATES = field(
        default="sigmoid", metadata={"help": "StableMoE's gate in stage 2 and inference: sigmoid (the paper's "
                                             "Eq. 14, σ(E_â·h)) or one (the expert's output as is; an ablation "
                                             "beyond the paper). Stage 1 keeps σ, which its balance loss needs"})
    stage1_assignment: STAGE1_ASSIGNMENTS = field(
        default="greedy", metadata={"help": "StableMoE stage-1 assignment: greedy (the paper's Eq. 6), or BASE "
                                            "layers' balanced assignment with no balance loss (the 'BASE Layer + "
                                            "fixed routing' ablation, paper Table 5)"})
    stage1_updates: str = field(
        default="6000", metadata={"help": "StableMoE: updates of stage 1; from this update on the distilled "
                                           "router is frozen and routes alone (stage 2). auto: stage 1 ends when "
                                           "the routing probes find the routing settled (--stage1-auto-*; needs "
                                           "--routing-probe-interval)"})
    distilled_router: DISTILLED_ROUTER_TYPES = field(
        default="wordemb", metadata={"help": "StableMoE distilled router: word embedding, causal width-5 CNN, "
                                             "bigram embedding, or a small causal Transformer"})
    distilled_dim: int = field(default=50, metadata={"help": "StableMoE distilled router feature size"})
    distilled_router_layers: int = field(
        default=1, metadata={"help": "--distilled-router transformer: its causal Transformer blocks (paper Table 6: "
                                     "1, 2, 3)"})
    capacity_factor: float = field(
        default=0.0, metadata={"help": "training: an expert takes at most factor × tokens / experts tokens, "
                                       "the rest pass through unchanged (0 = unlimited)"})
    eval_capacity_factor: float = field(
        default=0.0, metadata={"help": "the same at validation and inference (0 = unlimited)"})
    moe_expert_parallel: EXPERT_PARALLEL_MODES = field(
        default="auto",
        metadata={"help": "with W > 1 processes: shard the experts, N/W per rank, and send tokens to them by "
                          "all-to-all (on), or replicate every expert on every rank (off); auto = on when W "
                          "divides --moe-experts"})
    dictionary_fingerprints: Optional[str] = field(
        default=None, metadata={"help": "set by fairseq-train: the dictionaries the model is trained with "
                                        "(fairseq_stablemoe/dictionaries.py); loading refuses other ones"})


@dataclass
class MoEConfig(MoELayerConfig):
    """MoE layers in one stack of blocks (stablemoe_lm): the layer, and where the layers go."""

    moe_layers: int = field(default=1, metadata={"help": "number of MoE layers"})
    moe_position: MOE_POSITIONS = field(
        default="middle",
        metadata={"help": "where MoE layers go: stacked after block L/2 (middle), after the last block (top), "
                          "before the first (bottom), or one after each of evenly spaced blocks (scattered)"},
    )


def fail(msg):
    raise ValueError(msg)


def validate_moe_config(cfg, num_blocks: int):
    """MoEConfig: where the layers go, then the layer. Fails early, naming the flag and the fix."""
    if cfg.moe_layers < 1:
        fail(f"--moe-layers must be at least 1 (got {cfg.moe_layers}); for a model without MoE use transformer_lm")
    if cfg.moe_layers > num_blocks:
        fail(f"--moe-layers {cfg.moe_layers} is larger than the number of Transformer blocks ({num_blocks}); "
             f"use at most {num_blocks} or more blocks")
    validate_choice("--moe-position", cfg.moe_position, MOE_POSITIONS)
    validate_moe_layer_config(cfg)


def validate_choice(flag: str, value, known):
    if str(value) not in [str(k) for k in known]:  # configs loaded by hydra or Python bypass argparse's choices
        fail(f"{flag} {value} is unknown; choose one of {', '.join(str(k) for k in known)}")


def validate_moe_layer_config(cfg):
    """MoELayerConfig. Fails early, naming the flag and the fix."""
    if cfg.moe_experts < 2:
        fail(f"--moe-experts must be at least 2 (got {cfg.moe_experts}); for a dense control keep it and use "
             f"--moe-routing dense, dense_deeper or dense_wider")
    if cfg.moe_sublayers < 1:
        fail(f"--moe-sublayers must be at least 1 (got {cfg.moe_sublayers})")
    ffn_dim = getattr(cfg, "moe_ffn_embed_dim", 0)  # legacy argparse archs may leave it unset
    if ffn_dim < 0:
        fail(f"--moe-ffn-embed-dim must be >= 0 (got {ffn_dim}); 0 means the model's FFN size")
    if cfg.distilled_dim < 1:
        fail(f"--distilled-dim must be at least 1 (got {cfg.distilled_dim}); the paper uses 50")
    router_layers = getattr(cfg, "distilled_router_layers", 1)  # configs saved before the flag lack it
    if router_layers < 1:
        fail(f"--distilled-router-layers must be at least 1 (got {router_layers}); the paper uses 1, 2 or 3")
    if router_layers != 1 and str(cfg.distilled_router) != "transformer":
        fail(f"--distilled-router-layers {router_layers} applies to --distilled-router transformer only (got "
             f"--distilled-router {cfg.distilled_router})")
    stage1_schedule(cfg.stage1_updates)
    if not (math.isfinite(cfg.capacity_factor) and math.isfinite(cfg.eval_capacity_factor)):
        fail(f"--capacity-factor/--eval-capacity-factor must be finite (got {cfg.capacity_factor}/"
             f"{cfg.eval_capacity_factor}); use 0 for unlimited")
    if cfg.capacity_factor < 0 or cfg.eval_capacity_factor < 0:
        fail(f"--capacity-factor/--eval-capacity-factor must be >= 0 (got {cfg.capacity_factor}/"
             f"{cfg.eval_capacity_factor}); 0 means unlimited")
    for flag, value, known in (("--distilled-router", cfg.distilled_router, DISTILLED_ROUTERS),
                               ("--moe-routing", cfg.moe_routing, ROUTINGS),
                               ("--hash-type", cfg.hash_type, HASH_TYPES),
                               ("--hash-gate", getattr(cfg, "hash_gate", "none"), HASH_GATES),
                               ("--stage2-gate", getattr(cfg, "stage2_gate", "sigmoid"), STAGE2_GATES),
                               ("--stage1-assignment", cfg.stage1_assignment, STAGE1_ASSIGNMENTS),
                               ("--moe-expert-parallel", getattr(cfg, "moe_expert_parallel", "auto"),
                                EXPERT_PARALLEL_MODES)):
        validate_choice(flag, value, known)
    routing = str(cfg.moe_routing)
    if str(cfg.stage1_assignment) != "greedy" and routing != "stablemoe":
        fail(f"--stage1-assignment {cfg.stage1_assignment} is a StableMoE ablation; use it with --moe-routing "
             f"stablemoe (for BASE layers themselves use --moe-routing base)")
    if str(cfg.hash_type) != "balanced" and routing != "hash":
        fail(f"--hash-type {cfg.hash_type} applies to --moe-routing hash only (got --moe-routing {routing})")
    validate_ablation_flags(cfg, routing)


def validate_ablation_flags(cfg, routing: str):
    """The gate and table ablations (configs saved before these flags lack them: their defaults)."""
    hash_gate, stage2_gate = str(getattr(cfg, "hash_gate", "none")), str(getattr(cfg, "stage2_gate", "sigmoid"))
    table = getattr(cfg, "hash_table", None)
    if hash_gate != "none" and routing != "hash":
        fail(f"--hash-gate {hash_gate} applies to --moe-routing hash only (got --moe-routing {routing}); "
             f"StableMoE's own gate is --stage2-gate")
    if stage2_gate != "sigmoid" and routing != "stablemoe":
        fail(f"--stage2-gate {stage2_gate} applies to --moe-routing stablemoe only (got --moe-routing {routing}); "
             f"for Hash layers use --hash-gate")
    if str(cfg.hash_type) == "file" and not table:
        fail("--hash-type file routes by the table of a StableMoE checkpoint: add --hash-table PATH (a "
             "checkpoint_last.pt written in stage 2)")
    if table and str(cfg.hash_type) != "file":
        fail(f"--hash-table {table} is read only with --hash-type file (got --hash-type {cfg.hash_type}); add "
             f"--hash-type file or drop --hash-table")
