"""Which tokens each expert gets (paper Table 9): a checkpoint's inference routing on a data split.

    stablemoe-expert-tokens DATA_DIR --path CKPT [--split valid] [--top 10] [--cpu]
    (the same: python -m fairseq_stablemoe.analysis.expert_tokens ...)

Prints, per MoE layer, each expert's share of the routed tokens (its load) and its most frequent tokens.
Example, on the model `make demo` trains:

    stablemoe-expert-tokens demo/bin --path demo/checkpoints/checkpoint_last.pt --split test --top 8 --cpu
"""
import argparse
from collections import OrderedDict

import torch
from fairseq import checkpoint_utils, utils
from tqdm import tqdm

from ..checkpoints import load_checked
from ..moe import MoELayer
from ..moe.decisions import forward_until
from . import quiet_logging


class ExpertTokenCounts:
    """Counts (expert, token id) pairs routed by each MoE layer of a model."""

    def __init__(self, model, vocab_sizes):
        named = [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]
        if not named:
            raise ValueError("the checkpoint's model has no MoE layer")
        self.model = model
        self.routings = [m.routing for _, m in named]
        self.counts = OrderedDict(
            (name, torch.zeros(m.num_experts, vocab_sizes(name), dtype=torch.long)) for name, m in named)

    def add(self, net_input: dict):
        names = list(self.counts)

        def on_call(i, args, routing):
            counts = self.counts[names[i]]
            pairs = routing.expert.cpu() * counts.size(1) + args[1].ids().cpu()
            counts.view(-1).add_(torch.bincount(pairs, minlength=counts.numel()))

        with torch.no_grad():
            forward_until(self.model, net_input, self.routings, on_call, before=False)


def report(counts: "OrderedDict[str, torch.Tensor]", dictionaries, split: str, top: int) -> str:
    lines = []
    for name, table in counts.items():
        dictionary = dictionaries(name)
        per_expert = table.sum(1)
        total = max(int(per_expert.sum()), 1)
        lines.append(f"{name}: {table.size(0)} experts, {total:,} {split} tokens (inference routing)")
        lines.append(f"  {'expert':>6}  {'load':>6}  most frequent tokens (count)")
        for expert in range(table.size(0)):
            k = min(top, int((table[expert] > 0).sum()))
            values, ids = table[expert].topk(k) if k else (table.new_zeros(0), table.new_zeros(0))
            tokens = ", ".join(f"{dictionary[int(i)]} ({int(v):,})" for v, i in zip(values, ids))
            lines.append(f"  {expert:>6}  {100 * int(per_expert[expert]) / total:>5.1f}%  {tokens or '-'}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="stablemoe-expert-tokens", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", metavar="DATA_DIR", help="the binarized data directory the model was trained on")
    parser.add_argument("--path", required=True, metavar="CKPT", help="a checkpoint (e.g. SAVE_DIR/checkpoint_best.pt)")
    parser.add_argument("--split", default="valid", help="data split to route (default: valid)")
    parser.add_argument("--top", type=int, default=10, help="tokens listed per expert (default: 10)")
    parser.add_argument("--max-tokens", type=int, default=4096, help="tokens per batch (default: 4096)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is available")
    args = parser.parse_args(argv)
    if args.top < 0:
        parser.error(f"--top must be >= 0 (got {args.top}): the number of tokens listed per expert")
    if args.max_tokens < 1:
        parser.error(f"--max-tokens must be at least 1 (got {args.max_tokens})")
    quiet_logging()

    overrides = {"data": args.data}
    state = load_checked(args.path, overrides)
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([args.path], overrides, state=state)
    model = models[0].eval()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    model.to(device)

    def dictionary(name):
        return task.source_dictionary if name.startswith("encoder.") else task.target_dictionary

    counts = ExpertTokenCounts(model, lambda name: len(dictionary(name)))
    task.load_dataset(args.split)
    batches = task.get_batch_iterator(
        dataset=task.dataset(args.split), max_tokens=args.max_tokens,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        ignore_invalid_inputs=True, num_workers=0,
    ).next_epoch_itr(shuffle=False)
    # a progress bar on a terminal only (stderr): the report on stdout stays clean
    for sample in tqdm(batches, desc=f"routing {args.split}", unit="batch", disable=None):
        if sample:
            counts.add(utils.apply_to_sample(lambda t: t.to(device), sample)["net_input"])
    print(report(counts.counts, dictionary, args.split, args.top))


if __name__ == "__main__":
    main()
