"""fairseq skips samples longer than the model's positions with one quiet line: fairseq-eval-lm with a too large
--tokens-per-sample, or --sample-break-mode eos on long lines, scores a sliver of the split (or no token at all)
and still prints a perplexity and exits 0. With the plugin imported, every task's filter_indices_by_size (fairseq's
own language_modeling too) counts what it skips in tokens: none scored, or more than half of the tokens skipped,
is an error; any skipped token a warning; each names the fix that fits the flags given."""
import logging

import numpy as np
from fairseq.tasks import FairseqTask

logger = logging.getLogger(__name__)

MOST = 0.5  # refuse when more than this share of a split's tokens would go unscored


def _tokens(dataset, indices) -> int:
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) == 0:
        return 0
    try:
        return int(np.asarray(dataset.num_tokens_vec(indices)).sum())
    except (NotImplementedError, AttributeError, TypeError):
        return int(sum(dataset.num_tokens(int(i)) for i in indices))


def advice(task, max_positions) -> str:
    from ..options import task_option

    mode = str(task_option(task, "sample_break_mode", "none") or "none")
    tokens_per_sample = task_option(task, "tokens_per_sample")
    if mode in ("eos", "complete", "complete_doc") and isinstance(max_positions, int):
        return (f"with --sample-break-mode {mode} a sample is a whole line (or document), and those longer than "
                f"{max_positions} tokens cannot be scored: pass --sample-break-mode none --tokens-per-sample "
                f"{max_positions}, which cuts the text into blocks the model can score")
    if isinstance(max_positions, int) and tokens_per_sample and int(tokens_per_sample) > max_positions:
        return (f"pass --tokens-per-sample {max_positions} (or less; the model was trained with at most "
                f"{max_positions} positions; --tokens-per-sample {tokens_per_sample} was given)")
    return ("shorten or drop the long samples, or evaluate a model trained with more positions "
            "(--tokens-per-sample, --max-source-positions, --max-target-positions)")


def check_coverage(task, dataset, indices, kept, max_positions) -> None:
    total, scored = _tokens(dataset, indices), _tokens(dataset, kept)
    skipped_samples = len(indices) - len(kept)
    if total == 0 or skipped_samples == 0:
        return
    share = 100 * scored / total
    what = (f"{skipped_samples:,} of {len(indices):,} samples are longer than the model's {max_positions} "
            f"positions and fairseq skips them")
    if scored == 0:
        raise ValueError(f"none of the split's {total:,} tokens would be scored: {what}; {advice(task, max_positions)}")
    if total - scored > MOST * total:
        raise ValueError(f"only {scored:,} of the split's {total:,} tokens ({share:.1f}%) would be scored: {what}; "
                         f"{advice(task, max_positions)}")
    logger.warning(f"{total - scored:,} of the split's {total:,} tokens ({100 - share:.1f}%) are SKIPPED: {what}, so "
                   f"the result covers {share:.1f}% of the tokens; {advice(task, max_positions)}")


def install() -> None:
    """Wrap FairseqTask.filter_indices_by_size (inherited by language_modeling, translation_multi_simple_epoch and
    ours) so that a split fairseq would mostly skip is refused whatever the task."""
    fairseq_filter = FairseqTask.filter_indices_by_size
    if getattr(fairseq_filter, "_stablemoe_coverage", False):
        return

    def filter_indices_by_size(self, indices, dataset, max_positions=None, ignore_invalid_inputs=False):
        kept = fairseq_filter(self, indices, dataset, max_positions, ignore_invalid_inputs)
        if ignore_invalid_inputs:  # otherwise fairseq itself refuses any sample too long
            check_coverage(self, dataset, indices, kept, max_positions)
        return kept

    filter_indices_by_size._stablemoe_coverage = True
    FairseqTask.filter_indices_by_size = filter_indices_by_size


install()
