"""One model over several devices: plans (which part goes where) and dispatch (moving activations between them)."""

from tl_vlm.placement.dispatch import dispatch, to_device
from tl_vlm.placement.offload import BlockOffload
from tl_vlm.placement.plan import parse_size, placement_units, plan_placement, unit_device

__all__ = ["BlockOffload", "dispatch", "parse_size", "placement_units", "plan_placement", "to_device", "unit_device"]
