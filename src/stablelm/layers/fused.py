"""Projections that read the same input run as one module: q/k/v and gate/up.

`FUSED` is the one table of how the reference's checkpoint names map onto the fused modules the model
declares; loading, saving, GPTQ and the inference layout all read it. In the plain layout a fused module
is a `Fused` container of the reference's nn.Linear modules (LoRA and PEFT find them by name), and
stablelm.layers.fast swaps it for one linear format that does a single matmul. Either way the forward
gets a tuple of outputs, and state dicts use the reference's names.
"""

from __future__ import annotations

import re

from torch import nn

FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PART_OF = {part: fused for fused, parts in FUSED.items() for part in parts}
# Where a decoder layer holds its projection modules, in the order its forward runs them.
LAYER_PROJECTIONS = (("self_attn", ("qkv_proj", "o_proj")), ("mlp", ("gate_up_proj", "down_proj")))

_MODULE_NAME = re.compile(r"(^|\.)(" + "|".join(FUSED) + r")\.(" + "|".join(PART_OF) + r")(\.|$)")
_REFERENCE_NAME = re.compile(r"(^|\.)(" + "|".join(PART_OF) + r")(\.|$)")


class Fused(nn.Module):
    """The reference's projections `parts` (nn.Linear each, same input), called together: a tuple out."""

    def __init__(self, **parts: nn.Linear):
        super().__init__()
        for name, linear in parts.items():
            setattr(self, name, linear)

    def forward(self, x):
        return tuple(linear(x) for linear in self.children())


def layer_projections(layer: nn.Module):
    """(owner module, owner's path in the layer, attribute) of each projection module of a decoder layer."""
    for path, names in LAYER_PROJECTIONS:
        owner = getattr(layer, path)
        for name in names:
            yield owner, path, name


def parts(name: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(reference name, nn.Linear) of what a projection module runs: the parts of a Fused, or itself."""
    return list(module.named_children()) if isinstance(module, Fused) else [(name, module)]


def reference_name(key: str) -> str:
    """'layers.0.self_attn.qkv_proj.q_proj.weight' -> 'layers.0.self_attn.q_proj.weight' (others unchanged)."""
    return _MODULE_NAME.sub(lambda m: f"{m.group(1)}{m.group(3)}{m.group(4)}", key)


def module_name(key: str) -> str:
    """The inverse of `reference_name`."""
    if _MODULE_NAME.search(key):
        return key
    return _REFERENCE_NAME.sub(lambda m: f"{m.group(1)}{PART_OF[m.group(2)]}.{m.group(2)}{m.group(3)}", key)


def state_dict_to_reference(module, state_dict, prefix, local_metadata) -> None:
    """A state-dict post-hook: the plain layout's nested names become the reference's, in place, in order."""
    if not any(_MODULE_NAME.search(k) for k in state_dict):
        return
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        state_dict[reference_name(key) if key.startswith(prefix) else key] = value


def state_dict_from_reference(module, state_dict, prefix, *args) -> None:
    """A load pre-hook: the reference's names become the plain layout's nested ones, in place."""
    for key in [k for k in state_dict if k.startswith(prefix) and _REFERENCE_NAME.search(k[len(prefix):])]:
        state_dict[prefix + module_name(key[len(prefix):])] = state_dict.pop(key)
