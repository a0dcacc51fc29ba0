"""The MoE flags shared by every model of the plugin, and their checks."""
import logging
import math
from dataclasses import dataclass, field, fields
from typing import Dict, Optional, Tuple

from fairseq.dataclass import ChoiceEnum, FairseqDataclass

from ..options import option

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

# the flags with a closed set of values, each with its set: configs loaded by hydra or Python bypass argparse's choices
CHOICES = {"distilled_router": DISTILLED_ROUTERS, "moe_routing": ROUTINGS, "hash_type": HASH_TYPES,
           "hash_gate": HASH_GATES, "stage2_gate": STAGE2_GATES, "stage1_assignment": STAGE1_ASSIGNMENTS,
           "moe_expert_parallel": EXPERT_PARALLEL_MODES}

logger = logging.getLogger(__name__)


# each MoE flag's --help text (the fields below stay one line each)
HELP = {
    "moe_experts": "experts per MoE layer (N)",
    "moe_sublayers": "pre-LN residual FFN sublayers per expert",
    "moe_ffn_embed_dim": "expert FFN inner size (0 = the model's FFN size)",
    "moe_routing": "routing strategy: stablemoe, the baselines switch, base (BASE layers), hash, or a dense "
                   "control: dense (one expert's FFN stack, FLOP-matched), dense_deeper / dense_wider (all experts' "
                   "parameters in one stack: --moe-experts × the sublayers / FFN size)",
    "hash_type": "--moe-routing hash: token -> expert table balanced by the training data's token frequencies (Hash "
                 "Layers), seeded random, or file: the frozen routing table of a StableMoE checkpoint (--hash-table)",
    "hash_table": "--hash-type file: a StableMoE checkpoint written in stage 2 with --distilled-router wordemb and "
                  "the same dictionary; its token -> expert table routes from update 0 (an ablation beyond the "
                  "paper)",
    "hash_gate": "--moe-routing hash: none (Hash Layers: the expert's output as is), or sigmoid: StableMoE's gate "
                 "σ(E_e·h) on the table's expert e, with learned centroids E (an ablation beyond the paper)",
    "stage2_gate": "StableMoE's gate in stage 2 and inference: sigmoid (the paper's Eq. 14, σ(E_â·h)) or one (the "
                   "expert's output as is; an ablation beyond the paper). Stage 1 keeps σ, which its balance loss "
                   "needs",
    "stage1_assignment": "StableMoE stage-1 assignment: greedy (the paper's Eq. 6), or BASE layers' balanced "
                         "assignment with no balance loss (the 'BASE Layer + fixed routing' ablation, paper Table 5)",
    "stage1_updates": "StableMoE: updates of stage 1; from this update on the distilled router is frozen and routes "
                      "alone (stage 2). auto: stage 1 ends when the routing probes find the routing settled "
                      "(--stage1-auto-*; needs --routing-probe-interval)",
    "distilled_router": "StableMoE distilled router: word embedding, causal width-5 CNN, bigram embedding, or a "
                        "small causal Transformer",
    "distilled_dim": "StableMoE distilled router feature size",
    "distilled_router_layers": "--distilled-router transformer: its causal Transformer blocks (paper Table 6: 1, 2, "
                               "3)",
    "capacity_factor": "training: an expert takes at most factor × tokens / experts tokens, the rest pass through "
                       "unchanged (0 = unlimited)",
    "eval_capacity_factor": "the same at validation and inference (0 = unlimited)",
    "moe_expert_parallel": "with W > 1 processes: shard the experts, N/W per rank, and send tokens to them by "
                           "all-to-all (on), or replicate every expert on every rank (off); auto = on when W "
                           "divides --moe-experts",
    "dictionary_fingerprints": "set by fairseq-train: the dictionaries the model is trained with "
                               "(fairseq_stablemoe/dictionaries.py); loading refuses other ones",
    "moe_layers": "number of MoE layers",
    "moe_position": "where MoE layers go: stacked after block L/2 (middle), after the last block (top), before the "
                    "first (bottom), or one after each of evenly spaced blocks (scattered)",
}


@dataclass
class MoELayerConfig(FairseqDataclass):
    """What one MoE layer is: experts, routing, distilled router, capacity, expert parallelism."""

    moe_experts: int = field(default=32, metadata={"help": HELP["moe_experts"]})
    moe_sublayers: int = field(default=3, metadata={"help": HELP["moe_sublayers"]})
    moe_ffn_embed_dim: int = field(default=0, metadata={"help": HELP["moe_ffn_embed_dim"]})
    moe_routing: MOE_ROUTINGS = field(default="stablemoe", metadata={"help": HELP["moe_routing"]})
    hash_type: HASH_TYPES = field(default="balanced", metadata={"help": HELP["hash_type"]})
    hash_table: Optional[str] = field(default=None, metadata={"help": HELP["hash_table"]})
    hash_gate: HASH_GATES = field(default="none", metadata={"help": HELP["hash_gate"]})
    stage2_gate: STAGE2_GATES = field(default="sigmoid", metadata={"help": HELP["stage2_gate"]})
    stage1_assignment: STAGE1_ASSIGNMENTS = field(default="greedy", metadata={"help": HELP["stage1_assignment"]})
    stage1_updates: str = field(default="6000", metadata={"help": HELP["stage1_updates"]})
    distilled_router: DISTILLED_ROUTER_TYPES = field(default="wordemb", metadata={"help": HELP["distilled_router"]})
    distilled_dim: int = field(default=50, metadata={"help": HELP["distilled_dim"]})
    distilled_router_layers: int = field(default=1, metadata={"help": HELP["distilled_router_layers"]})
    capacity_factor: float = field(default=0.0, metadata={"help": HELP["capacity_factor"]})
    eval_capacity_factor: float = field(default=0.0, metadata={"help": HELP["eval_capacity_factor"]})
    moe_expert_parallel: EXPERT_PARALLEL_MODES = field(default="auto", metadata={"help": HELP["moe_expert_parallel"]})
    dictionary_fingerprints: Optional[str] = field(default=None, metadata={"help": HELP["dictionary_fingerprints"]})


@dataclass
class MoEConfig(MoELayerConfig):
    """MoE layers in one stack of blocks (stablemoe_lm): the layer, and where the layers go."""

    moe_layers: int = field(default=1, metadata={"help": HELP["moe_layers"]})
    moe_position: MOE_POSITIONS = field(default="middle", metadata={"help": HELP["moe_position"]})


def fail(msg):
    raise ValueError(msg)


@dataclass(frozen=True)
class Placement:
    """Where one stack's MoE layers go: `layers` of them, at `position`, named by the flags `--<prefix>moe-...`."""

    side: str  # "decoder" (stablemoe_lm), or "encoder" / "decoder" (stablemoe_transformer)
    layers: int
    position: str
    prefix: str  # "" for stablemoe_lm's --moe-layers, "encoder-" / "decoder-" for the translation model's

    def check(self, blocks: int):
        layers, position = f"--{self.prefix}moe-layers", f"--{self.prefix}moe-position"
        if not self.prefix and self.layers < 1:
            fail(f"{layers} must be at least 1 (got {self.layers}); for a model without MoE use transformer_lm")
        if not self.prefix and self.layers > blocks:
            fail(f"{layers} {self.layers} is larger than the number of Transformer blocks ({blocks}); use at most "
                 f"{blocks} or more blocks")
        if self.prefix and not 0 <= self.layers <= blocks:
            fail(f"{layers} must be between 0 and --{self.side}-layers ({blocks}); got {self.layers}")
        validate_choice(position, self.position, MOE_POSITIONS)


@dataclass(frozen=True)
class MoESettings:
    """The MoE settings of a model, typed and validated: built once from fairseq's config by `of`, passed to
    everything that builds or checks MoE layers. Fields are named as MoELayerConfig's flags; a config saved before
    a flag existed gets the flag's default here, and only here. Derived facts are methods."""

    moe_experts: int
    moe_sublayers: int
    moe_ffn_embed_dim: int
    moe_routing: str
    hash_type: str
    hash_table: Optional[str]
    hash_gate: str
    stage2_gate: str
    stage1_assignment: str
    stage1_updates: object  # --stage1-updates as stage1_schedule() parses it
    distilled_router: str
    distilled_dim: int
    distilled_router_layers: int
    capacity_factor: float
    eval_capacity_factor: float
    moe_expert_parallel: str
    seed: int  # fairseq's --seed (--hash-type random draws its table from it)
    placements: Tuple[Placement, ...]

    @classmethod
    def of(cls, cfg) -> "MoESettings":
        """From a model config of any form (an MoESettings passes through). Validates the layer's flags."""
        if isinstance(cfg, MoESettings):
            return cfg
        raw = {f.name: option(cfg, f.name, f.default) for f in fields(MoELayerConfig)
               if f.name not in ("dictionary_fingerprints", "_name")}
        for name in CHOICES:
            raw[name] = str(raw[name])
        validate_layer(raw)
        raw["stage1_updates"] = stage1_schedule(raw["stage1_updates"])
        return cls(**raw, seed=int(option(cfg, "seed", 1)), placements=placements_of(cfg))

    def check_placements(self, blocks: Dict[str, int]):
        """Against the model's blocks per stack ({"decoder": 12}, or the encoder's and decoder's)."""
        for placement in self.placements:
            placement.check(blocks[placement.side])
        if sum(placement.layers for placement in self.placements) == 0:
            fail("--encoder-moe-layers and --decoder-moe-layers are both 0: that is fairseq's transformer; use "
                 "--arch transformer, or place at least one MoE layer")

    def expert_layout(self, model_ffn_dim: int) -> Tuple[int, int, int]:
        """(experts, expert FFN inner size, sublayers per expert) of one layer: the routing decides (a dense
        control holds one FFN stack)."""
        return ROUTINGS[self.moe_routing].expert_layout(self, model_ffn_dim)

    @property
    def num_experts(self) -> int:
        return self.expert_layout(0)[0]

    def expert_parallel_world(self, world: int, warn: bool = False) -> int:
        """How many of `world` processes each layer's experts are sharded over; 1 = every expert on every rank
        (also a dense control's one FFN stack, shared like any parameter). `warn`: say so where auto falls back to
        replicated experts (the layer's builder does, once per layer)."""
        experts = self.num_experts
        if world == 1 or self.moe_expert_parallel == "off" or experts == 1:
            return 1
        if experts % world == 0:
            return world
        if self.moe_expert_parallel == "on":
            fail(f"--moe-expert-parallel on needs the number of processes ({world}) to divide --moe-experts "
                 f"({experts}); use a multiple of {world} experts, or --moe-expert-parallel off to replicate the "
                 f"experts on every rank")
        if warn:  # auto, not divisible: replicated
            logger.warning(f"{world} processes do not divide --moe-experts {experts}: every rank holds all experts "
                           f"(no expert parallelism); use a multiple of {world} experts to shard them")
        return 1


def placements_of(cfg) -> Tuple[Placement, ...]:
    if option(cfg, "encoder_moe_layers") is not None:  # stablemoe_transformer: a count and position per stack
        return tuple(Placement(side, int(option(cfg, f"{side}_moe_layers")),
                               str(option(cfg, f"{side}_moe_position", "middle")), f"{side}-")
                     for side in ("encoder", "decoder"))
    return (Placement("decoder", int(option(cfg, "moe_layers", 1)), str(option(cfg, "moe_position", "middle")), ""),)


def validate_choice(flag: str, value, known):
    if str(value) not in [str(k) for k in known]:  # configs loaded by hydra or Python bypass argparse's choices
        fail(f"{flag} {value} is unknown; choose one of {', '.join(str(k) for k in known)}")


def validate_layer(cfg: dict):
    """MoELayerConfig's flags, by name. Fails early, naming the flag and the fix."""
    if cfg["moe_experts"] < 2:
        fail(f"--moe-experts must be at least 2 (got {cfg['moe_experts']}); for a dense control keep it and use "
             f"--moe-routing dense, dense_deeper or dense_wider")
    if cfg["moe_sublayers"] < 1:
        fail(f"--moe-sublayers must be at least 1 (got {cfg['moe_sublayers']})")
    if cfg["moe_ffn_embed_dim"] < 0:
        fail(f"--moe-ffn-embed-dim must be >= 0 (got {cfg['moe_ffn_embed_dim']}); 0 means the model's FFN size")
    if cfg["distilled_dim"] < 1:
        fail(f"--distilled-dim must be at least 1 (got {cfg['distilled_dim']}); the paper uses 50")
    router_layers = cfg["distilled_router_layers"]
    if router_layers < 1:
        fail(f"--distilled-router-layers must be at least 1 (got {router_layers}); the paper uses 1, 2 or 3")
    if router_layers != 1 and cfg["distilled_router"] != "transformer":
        fail(f"--distilled-router-layers {router_layers} applies to --distilled-router transformer only (got "
             f"--distilled-router {cfg['distilled_router']})")
    stage1_schedule(cfg["stage1_updates"])
    capacity, eval_capacity = cfg["capacity_factor"], cfg["eval_capacity_factor"]
    if not (math.isfinite(capacity) and math.isfinite(eval_capacity)):
        fail(f"--capacity-factor/--eval-capacity-factor must be finite (got {capacity}/{eval_capacity}); use 0 "
             f"for unlimited")
    if capacity < 0 or eval_capacity < 0:
        fail(f"--capacity-factor/--eval-capacity-factor must be >= 0 (got {capacity}/{eval_capacity}); 0 means "
             f"unlimited")
    for name, known in CHOICES.items():
        validate_choice(flag(name), cfg[name], known)
    routing = cfg["moe_routing"]
    if cfg["stage1_assignment"] != "greedy" and routing != "stablemoe":
        fail(f"--stage1-assignment {cfg['stage1_assignment']} is a StableMoE ablation; use it with --moe-routing "
             f"stablemoe (for BASE layers themselves use --moe-routing base)")
    if cfg["hash_type"] != "balanced" and routing != "hash":
        fail(f"--hash-type {cfg['hash_type']} applies to --moe-routing hash only (got --moe-routing {routing})")
    validate_ablation_flags(cfg, routing)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate_ablation_flags(cfg: dict, routing: str):
    """The gate and table ablations."""
    hash_gate, stage2_gate, table = cfg["hash_gate"], cfg["stage2_gate"], cfg["hash_table"]
    if hash_gate != "none" and routing != "hash":
        fail(f"--hash-gate {hash_gate} applies to --moe-routing hash only (got --moe-routing {routing}); "
             f"StableMoE's own gate is --stage2-gate")
    if stage2_gate != "sigmoid" and routing != "stablemoe":
        fail(f"--stage2-gate {stage2_gate} applies to --moe-routing stablemoe only (got --moe-routing {routing}); "
             f"for Hash layers use --hash-gate")
    if cfg["hash_type"] == "file" and not table:
        fail("--hash-type file routes by the table of a StableMoE checkpoint: add --hash-table PATH (a "
             "checkpoint_last.pt written in stage 2)")
    if table and cfg["hash_type"] != "file":
        fail(f"--hash-table {table} is read only with --hash-type file (got --hash-type {cfg['hash_type']}); add "
             f"--hash-type file or drop --hash-table")
