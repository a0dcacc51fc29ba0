from .base import Routing, TokenView, affinities, expert_load
from .stablemoe import StableMoERouting

ROUTINGS = {"stablemoe": StableMoERouting}
