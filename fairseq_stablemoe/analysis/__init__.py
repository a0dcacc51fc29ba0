"""Command-line analyses of trained models and routing records (paper §1.1 Figs. 2 and 7, Table 9)."""
import logging


def quiet_logging():
    """Importing fairseq's text_to_speech task sets the root logger to DEBUG; our tools print their own report."""
    logging.getLogger().setLevel(logging.WARNING)
