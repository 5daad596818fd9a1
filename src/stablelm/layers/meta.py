"""Building modules on the meta device without running their initialisers."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


@contextlib.contextmanager
def skip_init():
    """Build modules on the meta device without running their initialisers.

    Under torch.device("meta") every nn.init call goes through torch's Python reference ops, whose
    first use imports torch._dynamo: over a second of a checkpoint's load, for values nobody reads.
    """
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_")
    saved = {name: getattr(nn.init, name) for name in names}
    try:
        for name in names:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)
