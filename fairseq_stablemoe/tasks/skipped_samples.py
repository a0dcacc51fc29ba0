"""fairseq skips samples longer than the model's positions without saying much: fairseq-eval-lm with a too large
--tokens-per-sample scores no token at all and still prints `Perplexity: 1.00`. Say so, loudly."""
import logging

logger = logging.getLogger(__name__)

MOST = 0.5  # warn when more than this share of a split is skipped


def check_skipped(total: int, kept: int, max_positions, tokens_per_sample):
    skipped = total - kept
    if total == 0 or skipped == 0:
        return
    fix = (f"pass --tokens-per-sample {max_positions} (or less; the model was trained with at most {max_positions} "
           f"positions)" if isinstance(max_positions, int) else "pass a smaller --tokens-per-sample")
    if kept == 0:
        raise ValueError(
            f"every one of the {total:,} samples is longer than the model's {max_positions} positions "
            f"(--tokens-per-sample {tokens_per_sample}): fairseq would skip them all and score no token; {fix}")
    if skipped > MOST * total:
        logger.warning(
            f"{skipped:,} of {total:,} samples ({100 * skipped / total:.0f}%) are longer than the model's "
            f"{max_positions} positions and are SKIPPED: the result covers only {100 * kept / total:.0f}% of the "
            f"split; {fix}")
