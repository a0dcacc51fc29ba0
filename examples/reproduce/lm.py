"""The language-model runs of the reproductions (paper Tables 2, 4, 5, 6, Figs. 2 and 4) at CPU scale.

Every model trains with the plugin's own CLI on the same data, batches and updates, then `fairseq-eval-lm`
scores the valid and test sets. A run is named by its row and seed; entry points that name the same run
(e.g. StableMoE seed 1 in Tables 2, 4, 5 and 6) share it.
"""
import json
import os
import re
import shutil
import sys
import threading
from dataclasses import dataclass, field, replace
from typing import List, Tuple

from common import HERE, PLUGIN, ROOT, SHARED, cached, fairseq_cli, locked, run_all, run_logged, slug, \
    threads_per_job

sys.path.insert(0, os.path.dirname(HERE))
from sentencepiece_bpe import encode, train as train_spm  # noqa: E402

DEFAULT_DATA = os.path.join(SHARED, "lm", "sotu")
MOE_ROUTINGS = ("stablemoe", "switch", "base", "hash")  # their expert parameters count as expert parameters


@dataclass(frozen=True)
class Scale:
    """Data, model and budget of every LM run of one mode."""
    train_lines: int  # 0: the whole training set
    eval_lines: int  # the first lines of valid and test that eval-lm scores
    curve_lines: int  # the first lines of valid scored during training (Fig. 4's curves)
    vocab: int
    dim: int
    blocks: int
    heads: int
    experts: int
    sublayers: int
    tokens_per_sample: int
    batch_size: int
    updates: int
    curve_points: int
    lr: float
    seeds: int
    probe_interval: int
    probe_tokens: int
    log_interval: int = 0  # updates per training-log line; 0: the validation interval

    def describe(self) -> str:
        return (f"{self.blocks} blocks of {self.dim}/{4 * self.dim} ({self.heads} heads, learned positions, "
                f"pre-LN, tied embeddings, dropout 0), sentencepiece BPE {self.vocab}; MoE: one layer of "
                f"{self.experts} experts × {self.sublayers} sublayers after block {self.blocks // 2}; "
                f"{self.batch_size} × {self.tokens_per_sample} tokens per update, {self.updates} updates "
                f"(StableMoE stage 1: the first 10 %), Adam (0.9, 0.98), lr {self.lr:g} with linear decay and "
                f"5 % warm-up, clip 0.1, α 0.3")


FULL = Scale(train_lines=0, eval_lines=500, curve_lines=100, vocab=4000, dim=64, blocks=4, heads=4, experts=8,
             sublayers=2, tokens_per_sample=128, batch_size=16, updates=200, curve_points=8, lr=3e-3, seeds=3,
             probe_interval=10, probe_tokens=4096)
# Long mode: 10x FULL's updates, so that stage 1 (200 updates) is long enough for the distilled router to learn
# (stage1-measurements: a word-embedding router is step-bound, N(0, 1) moved ~lr per Adam step), on a vocabulary
# of 1,000 so that stage 1's 100K tokens cover nearly every type of the validation text, and a model small
# enough that 3 seeds of 6 rows fit in about an hour of one CPU core (measured: see RESULTS.md).
LONG = Scale(train_lines=0, eval_lines=500, curve_lines=100, vocab=1000, dim=32, blocks=2, heads=4, experts=8,
             sublayers=2, tokens_per_sample=64, batch_size=8, updates=2000, curve_points=10, lr=3e-3, seeds=3,
             probe_interval=100, probe_tokens=2048, log_interval=25)
# Medium mode (issue 20): 16x LONG's model on the same corpus, vocabulary and stage-1 share, to see whether the
# long mode's ranking holds with size: 4 blocks of 128/512, 16 x 128 tokens per update, 3,000 updates (stage 1:
# 300), lr 2e-3 with 150 warm-up updates; eval-lm on the first 100 lines of valid and test (about 0.46 s an
# update, so ~25 min a run, on one idle core).
MEDIUM = Scale(train_lines=0, eval_lines=100, curve_lines=100, vocab=1000, dim=128, blocks=4, heads=4, experts=8,
               sublayers=2, tokens_per_sample=128, batch_size=16, updates=3000, curve_points=10, lr=2e-3, seeds=2,
               probe_interval=300, probe_tokens=2048, log_interval=50)
QUICK = Scale(train_lines=300, eval_lines=30, curve_lines=20, vocab=200, dim=32, blocks=2, heads=2, experts=4,
              sublayers=2, tokens_per_sample=32, batch_size=4, updates=20, curve_points=2, lr=3e-3, seeds=1,
              probe_interval=5, probe_tokens=256)


@dataclass(frozen=True)
class Run:
    """One row's model: its fairseq-train flags beyond the common ones, and its seed."""
    name: str
    flags: Tuple[str, ...]
    routing: str = ""  # "" for fairseq's own transformer_lm
    seed: int = 1
    stage1_fraction: float = 0.1
    note: str = field(default="", compare=False)

    @property
    def folder(self) -> str:
        return f"{slug(self.name)}-s{self.seed}"

    def seeded(self, seed: int) -> "Run":
        return replace(self, seed=seed)


def standard() -> Run:
    return Run("Standard Transformer", ("--task", "language_modeling", "--arch", "transformer_lm",
                                        "--criterion", "cross_entropy"))


def moe(name: str, routing: str, *extra: str, stage1_fraction: float = 0.1, note: str = "") -> Run:
    return Run(name, ("--task", "stablemoe_language_modeling", "--arch", "stablemoe_lm_tiny",
                      "--criterion", "stablemoe_cross_entropy", "--moe-routing", routing) + extra,
               routing=routing, stage1_fraction=stage1_fraction, note=note)


TABLE2 = [
    standard(),
    moe("Larger Transformer (deeper)", "dense_deeper"),
    moe("Larger Transformer (wider)", "dense_wider"),
    moe("Switch Transformer", "switch"),
    moe("BASE Layer", "base"),
    moe("Hash Layer", "hash"),
    moe("StableMoE", "stablemoe"),
]
STABLEMOE = TABLE2[-1]
# stage 1 assigns by BASE's balanced assignment and distils it; stage 2 as StableMoE (paper Table 5)
BASE_FIXED = moe("BASE fixed routing", "stablemoe", "--stage1-assignment", "balanced")
# long mode: Table 2 without the larger dense controls (twice the cost), with BASE + fixed routing
TABLE2_LONG = [TABLE2[0], *TABLE2[3:], BASE_FIXED]


class LMReproduction:
    def __init__(self, args, scale: Scale, out: str):
        self.args, self.scale, self.out = args, scale, out
        self.threads = threads_per_job(args.jobs)

    # data -------------------------------------------------------------------------------------------------
    def prepare(self) -> str:
        """sotu-style train/valid/test.txt -> capped text -> sentencepiece BPE -> fairseq binaries (once)."""
        s, data = self.scale, self.args.data
        if not os.path.exists(os.path.join(data, "train.txt")):
            sys.exit(f"--data {data}: no train.txt there. Pass a folder with train/valid/test.txt (one "
                     f"paragraph per line), or fetch the State-of-the-Union text with "
                     f"`python examples/demo/prepare_sotu.py FOLDER` and pass --data FOLDER")
        dest = os.path.join(self.out, "data")
        with locked(dest):
            if os.path.exists(os.path.join(dest, "bin", "test.bin")):
                return os.path.join(dest, "bin")
            text = os.path.join(dest, "text")
            os.makedirs(text, exist_ok=True)
            caps = {"train": s.train_lines, "valid": s.eval_lines, "test": s.eval_lines}
            for split, cap in caps.items():
                with open(os.path.join(data, f"{split}.txt")) as src, open(f"{text}/{split}.txt", "w") as dst:
                    dst.writelines(line for i, line in enumerate(src) if line.strip() and (not cap or i < cap))
            with open(f"{text}/valid.txt") as src, open(f"{text}/curve.txt", "w") as dst:
                dst.writelines(src.readlines()[:s.curve_lines])
            train_spm([f"{text}/train.txt"], f"{dest}/spm", s.vocab, hard_vocab_limit=False)
            for split in ("train", "valid", "curve", "test"):
                encode(f"{dest}/spm.model", f"{text}/{split}.txt", f"{text}/{split}.bpe")
            # valid: what eval-lm scores; valid1 (the curve set): what training validates on and probes
            run_logged(fairseq_cli("preprocess") + [
                "--only-source", "--trainpref", f"{text}/train.bpe", "--validpref",
                f"{text}/valid.bpe,{text}/curve.bpe", "--testpref", f"{text}/test.bpe",
                "--destdir", f"{dest}/bin.tmp", "--workers", "2"], f"{dest}/preprocess.log")
            shutil.rmtree(f"{dest}/bin", ignore_errors=True)
            os.replace(f"{dest}/bin.tmp", f"{dest}/bin")
        return os.path.join(dest, "bin")

    # training and evaluation ------------------------------------------------------------------------------
    def shape(self) -> List[str]:
        s = self.scale
        # transformer_lm's input/output dims default to 512 whatever the embedding size: set them
        return ["--decoder-embed-dim", s.dim, "--decoder-input-dim", s.dim, "--decoder-output-dim", s.dim,
                "--decoder-ffn-embed-dim", 4 * s.dim, "--decoder-layers", s.blocks,
                "--decoder-attention-heads", s.heads, "--decoder-learned-pos", "--decoder-normalize-before",
                "--share-decoder-input-output-embed", "--dropout", 0, "--attention-dropout", 0,
                "--activation-fn", "relu"]

    def train_flags(self, run: Run, data: str, save_dir: str) -> list:
        s = self.scale
        interval = max(1, s.updates // s.curve_points)
        flags = [data, "--user-dir", PLUGIN, *self.shape(),
                 "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", 0.1, "--lr", s.lr,
                 "--lr-scheduler", "polynomial_decay", "--total-num-update", s.updates,
                 "--warmup-updates", max(1, s.updates // 20), "--max-update", s.updates,
                 "--tokens-per-sample", s.tokens_per_sample, "--sample-break-mode", "none",
                 "--batch-size", s.batch_size, "--valid-subset", "valid1", "--validate-interval-updates", interval,
                 "--save-interval-updates", interval, "--keep-interval-updates", 1, "--no-epoch-checkpoints",
                 "--save-dir", save_dir, "--log-format", "json", "--log-interval", s.log_interval or interval,
                 "--seed", run.seed, "--cpu", "--num-workers", 0]
        if run.routing:
            flags += ["--moe-experts", s.experts, "--moe-sublayers", s.sublayers]
        if run.routing in MOE_ROUTINGS:
            flags += ["--routing-probe-interval", s.probe_interval, "--routing-probe-tokens", s.probe_tokens]
        if run.routing == "stablemoe":
            flags += ["--stage1-updates", max(1, round(run.stage1_fraction * s.updates))]
        return flags + list(run.flags)  # last, so that a row's own flags win

    def result(self, run: Run) -> dict:
        folder = os.path.join(self.out, "runs", run.folder)
        path = os.path.join(folder, "result.json")
        result = cached(path, lambda: self._train_and_score(run, folder))
        if self.needs_freeze_report(run) and "freeze" not in result:  # a result written before the report existed
            with locked(path):
                result["freeze"] = freeze_report(folder, self.prepare(), self.scale.tokens_per_sample)
                with open(path + ".tmp", "w") as f:
                    json.dump(result, f, indent=1)
                os.replace(path + ".tmp", path)
        return result

    def finished(self, run: Run) -> bool:
        return os.path.exists(os.path.join(self.out, "runs", run.folder, "result.json"))

    def needs_freeze_report(self, run: Run) -> bool:
        return (self.scale is LONG or self.scale is MEDIUM) and run.routing in ("stablemoe", "hash")

    def _train_and_score(self, run: Run, folder: str) -> dict:
        data = self.prepare()
        os.makedirs(folder, exist_ok=True)
        print(f"training {run.folder} ...", flush=True)
        run_logged(fairseq_cli("train") + self.train_flags(run, data, folder),
                         os.path.join(folder, "train.log"), self.threads)
        result = {"name": run.name, "seed": run.seed, "routing": run.routing}
        for split in ("valid", "test"):
            scored = run_logged(fairseq_cli("eval_lm") + [
                data, "--user-dir", PLUGIN, "--path", os.path.join(folder, "checkpoint_last.pt"),
                "--gen-subset", split, "--tokens-per-sample", self.scale.tokens_per_sample, "--batch-size", 32,
                "--cpu", "--num-workers", 0], os.path.join(folder, f"eval_{split}.log"), self.threads, False)
            result[f"{split}_ppl"] = float(re.findall(r"Perplexity: ([0-9.]+)", scored)[-1])
        result.update(model_size(os.path.join(folder, "checkpoint_last.pt"), run.routing,
                                 self.scale.tokens_per_sample))
        if self.needs_freeze_report(run):
            result["freeze"] = freeze_report(folder, data, self.scale.tokens_per_sample)
        result["train_seconds"] = training_seconds(os.path.join(folder, "train.log"))
        print(f"done {run.folder}: valid ppl {result['valid_ppl']:.2f}", flush=True)
        return result

    def curve(self, run: Run) -> List[dict]:
        with open(os.path.join(self.out, "runs", run.folder, "train.log")) as f:
            return training_curve(f.read())

    def results(self, runs: List[Run]) -> List[dict]:
        return run_all([lambda run=run: self.result(run) for run in runs], self.args.jobs)

    def seeds(self) -> List[int]:
        return list(range(1, self.scale.seeds + 1))


def training_curve(log: str) -> List[dict]:
    """(update, cumulative training seconds, curve-set ppl) at each validation of fairseq's JSON log.

    A resumed run's log holds both attempts: the later line for an update wins, and its seconds continue
    from those of the update it resumed from."""
    curve, seconds_at, seconds, last_update = {}, {}, 0.0, 0
    for line in log.splitlines():
        if "| train_inner | " in line:
            stats = json.loads(line.split("| train_inner | ", 1)[1])
            last_update = int(stats["num_updates"])
            before = [u for u in seconds_at if u < last_update]
            seconds = (seconds_at[max(before)] if before else 0.0) + float(stats["train_wall"])
            seconds_at[last_update] = seconds
        elif "| valid1 | " in line:
            stats = json.loads(line.split("| valid1 | ", 1)[1])
            update = int(stats["valid1_num_updates"])
            curve[update] = {"update": update, "train_seconds": seconds if update == last_update else None,
                             "ppl": float(stats["valid1_ppl"])}
    return [curve[u] for u in sorted(curve)]


def training_seconds(log_path: str):
    """fairseq's train_wall in the last epoch summary of the log: seconds in training steps (the last attempt's)."""
    last = None
    with open(log_path) as f:
        lines = f.read().splitlines()
    for line in lines:
        if "| train | " in line:  # the epoch summary; a resumed run has one per attempt
            last = float(json.loads(line.split("| train | ", 1)[1])["train_wall"])
    return last


def agreement_at_freeze(log_path: str):
    """(update, distill_acc) of the last training-log interval spent wholly in stage 1: the distilled router's
    agreement with the backbone's assignment just before it is frozen."""
    found = None
    with open(log_path) as f:
        for line in f:
            if "| train_inner | " in line:
                stats = json.loads(line.split("| train_inner | ", 1)[1])
                if float(stats.get("stage", 0)) == 1.0 and "distill_acc" in stats:
                    found = (int(stats["num_updates"]), float(stats["distill_acc"]))
    return found


def freeze_report(folder: str, data: str, tokens: int) -> dict:
    with _LOADING:
        return _freeze_report(folder, data, tokens)


def _freeze_report(folder: str, data: str, tokens: int) -> dict:
    """What StableMoE froze: the router's agreement with the backbone at the freeze (training log), the share
    of validation tokens whose type the router saw in stage 1, and the frozen routing's load on validation.

    "Seen in stage 1": the token's row of the router's embedding had a gradient before the freeze, i.e. a
    non-zero Adam second moment in checkpoint_last.pt (a frozen router gets no gradient, so its Adam state is
    the state at the freeze). Unknown (None) if the optimizer state does not line up with the parameters
    (e.g. a run resumed after the switch)."""
    import torch
    from fairseq import checkpoint_utils, utils
    from fairseq.data import data_utils

    utils.import_user_module(type("Args", (), {"user_dir": PLUGIN})())
    path = os.path.join(folder, "checkpoint_last.pt")
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([path])
    model = models[0].eval()
    layer = model.moe_layers()[0]
    valid = data_utils.load_indexed_dataset(os.path.join(data, "valid"), task.source_dictionary)
    stream = torch.cat([valid[i] for i in range(len(valid))]).long()
    blocks = stream[: len(stream) // tokens * tokens].view(-1, tokens)
    router = getattr(layer.routing, "distilled_router", None)
    with torch.no_grad():  # a hash routing's table is the fixed routing it compares with
        experts = layer.routing.table[blocks].flatten() if router is None else \
            torch.cat([router.route(b, tokens, fixed=layer.routing.in_stage2) for b in blocks.split(64)]).flatten()
    load = torch.bincount(experts, minlength=layer.routing.num_experts).float()
    report = {"valid_load_max_mean": (load.max() / load.mean()).item(), "valid_tokens": blocks.numel()}
    if router is None:
        return {"agreement_update": None, "agreement": None, "valid_seen_share": None, **report}

    seen_share = None
    state = checkpoint_utils.load_checkpoint_to_cpu(path)
    moments = state.get("last_optimizer_state", {}).get("state", {})
    params = list(model.named_parameters())
    if len(moments) == len(params) and all(moments[i]["exp_avg_sq"].shape == p.shape
                                           for i, (_, p) in enumerate(params)):
        index = next(i for i, (n, _) in enumerate(params) if n.endswith("distilled_router.embed.weight"))
        seen = moments[index]["exp_avg_sq"].abs().sum(1) > 0
        seen_share = seen[blocks.flatten()].float().mean().item()
    update, agreement = agreement_at_freeze(os.path.join(folder, "train.log")) or (None, None)
    return {"agreement_update": update, "agreement": agreement, "valid_seen_share": seen_share, **report}


_LOADING = threading.Lock()  # fairseq's registries and user-dir import are not thread-safe


def model_size(checkpoint: str, routing: str, tokens: int) -> dict:
    """Shared and expert parameters, and forward FLOPs per sequence of `tokens` (torch's FLOP counter)."""
    with _LOADING:
        return _model_size(checkpoint, routing, tokens)


def _model_size(checkpoint: str, routing: str, tokens: int) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from fairseq import checkpoint_utils, utils

    utils.import_user_module(type("Args", (), {"user_dir": PLUGIN})())
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([checkpoint])
    model = models[0].eval()
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n) \
        if routing in MOE_ROUTINGS else 0
    router = sum(p.numel() for n, p in model.named_parameters() if ".distilled_router." in n)
    total = sum(p.numel() for p in model.parameters())
    vocab = len(task.source_dictionary)
    sequence = torch.randint(task.source_dictionary.nspecial, vocab, (1, tokens))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(sequence)
    # the paper's shared parameters leave out StableMoE's distilled router (2.5M of 124M there; 200K of 660K here)
    return {"shared_params": total - expert - router, "expert_params": expert, "router_params": router,
            "flops_per_sequence": counter.get_total_flops()}


def setup(doc: str, add_arguments=None):
    """The entry point's reproduction from its command line; add_arguments(parser) adds the entry point's own."""
    from common import out_dir, parser

    p = parser(doc, DEFAULT_DATA)
    if add_arguments:
        add_arguments(p)
    args = p.parse_args()
    scale = QUICK if args.quick else LONG if args.long else MEDIUM if getattr(args, "medium", False) else FULL
    return LMReproduction(args, scale, out_dir(args))


__all__ = ["LMReproduction", "Run", "Scale", "FULL", "LONG", "MEDIUM", "QUICK", "TABLE2", "TABLE2_LONG", "STABLEMOE",
           "BASE_FIXED", "moe", "standard", "setup", "ROOT"]
