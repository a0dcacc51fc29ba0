"""A rank launched without the others waits in torch's init_process_group without a word (for up to torch's
timeout, 30 minutes by default). With the plugin imported, fairseq's distributed_init says, after WAIT_WARNING_S
seconds and then every WAIT_WARNING_S, who is waiting for whom and what to check."""
import logging
import threading

from .options import option

logger = logging.getLogger(__name__)

WAIT_WARNING_S = 60.0


def _waiting(rank, world, method, waited):
    logger.warning(f"rank {rank} has waited {waited:.0f} s for the other {world - 1} process(es) of "
                   f"--distributed-world-size {world} at --distributed-init-method {method}: start the other ranks "
                   f"with the same --distributed-init-method and --distributed-world-size (and their own "
                   f"--distributed-rank), or check that the address and port are reachable from every process")


def install() -> None:
    from fairseq.distributed import utils as distributed_utils

    fairseq_init = distributed_utils.distributed_init
    if getattr(fairseq_init, "_stablemoe_wait", False):
        return

    def distributed_init(cfg):
        dt = option(cfg, "distributed_training", cfg)
        world, rank = option(dt, "distributed_world_size", 1), option(dt, "distributed_rank", 0)
        method = option(dt, "distributed_init_method")
        done = threading.Event()

        def watch():
            waited = 0.0
            while not done.wait(WAIT_WARNING_S):
                waited += WAIT_WARNING_S
                _waiting(rank, world, method, waited)

        if world and world > 1:
            threading.Thread(target=watch, daemon=True, name="stablemoe-init-wait").start()
        try:
            return fairseq_init(cfg)
        finally:
            done.set()

    distributed_init._stablemoe_wait = True
    distributed_utils.distributed_init = distributed_init


install()
