from .base import CentroidRouting, RoutingDecision, RoutingStrategy, TokenView, Vocabulary, affinities, expert_load
from .base_layer import BASERouting
from .dense import DeeperDenseRouting, DenseRouting, WiderDenseRouting
from .hash import HashRouting
from .stablemoe import StableMoERouting
from .switch import SwitchRouting

ROUTINGS = {
    "stablemoe": StableMoERouting,
    "switch": SwitchRouting,
    "base": BASERouting,
    "hash": HashRouting,
    "dense": DenseRouting,
    "dense_deeper": DeeperDenseRouting,
    "dense_wider": WiderDenseRouting,
}
