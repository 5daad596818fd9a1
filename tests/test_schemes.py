"""Quantization schemes (stablelm.layers.schemes): each scheme's stored layout round-trips, config entries are
read back, and a new scheme is one class plus a format: a toy one loads, saves and runs end to end without
touching the loader, the saver or the model (issue 28)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_checkpoint

import stablelm
from stablelm.layers import linear, schemes


@pytest.mark.parametrize("name", list(schemes.SCHEMES))
def test_fields_round_trip_through_the_stored_layout(name):
    scheme = schemes.SCHEMES[name]
    weight = torch.randn(96, 128, generator=torch.Generator().manual_seed(0))
    fields = scheme.quantize(weight)
    stored = scheme.to_stored(fields)
    layout = scheme.stored_layout(96, 128)
    assert set(stored) == set(layout)
    for suffix, tensor in stored.items():
        shape, dtypes = layout[suffix]
        assert tuple(tensor.shape) == shape and tensor.dtype in dtypes
    back = scheme.from_stored(stored)
    assert all(torch.equal(back[k], fields[k]) for k in fields)
    error = (scheme.dequantize(fields) - weight).abs().max() / weight.abs().max()
    assert error < 2.0 ** (1 - scheme.bits) * 2


def test_config_names_the_scheme_and_old_files_still_read():
    for scheme in schemes.SCHEMES.values():
        assert schemes.scheme_from_config(scheme.config(), "c") is scheme
    old = {"quant_method": "stablelm-weight-only", "bits": 4, "group_size": 64}  # written before schemes were named
    assert schemes.scheme_from_config(old, "c").name == "int4"
    for bad in ({"quant_method": "gptq", "bits": 4}, {"quant_method": "stablelm-weight-only", "scheme": "int3"},
                {"quant_method": "stablelm-weight-only", "scheme": "int8", "bits": 4},
                {"quant_method": "stablelm-weight-only", "bits": 4, "group_size": 128}):
        with pytest.raises(ValueError, match="c: "):
            schemes.scheme_from_config(bad, "c")


# -- a toy scheme, end to end ------------------------------------------------------------------------
class Int6Rows(schemes.Scheme):
    """Symmetric int6 per output row: w = q * scale, q in [-31, 31] stored as int8."""

    name, bits, gguf_peer = "int6", 6, "q6_k"

    def quantize(self, weight):
        scale = (weight.float().abs().amax(dim=1) / 31).clamp(min=1e-10)
        return {"q": torch.round(weight.float() / scale[:, None]).clamp(-31, 31).to(torch.int8), "scale": scale}

    def dequantize(self, fields, dtype=torch.float32):
        return (fields["q"].float() * fields["scale"].float()[:, None]).to(dtype)

    def stored_layout(self, n, k):
        return {"weight": ((n, k), (torch.int8,)), "weight_scale": ((n,), schemes.FLOATS)}

    def to_stored(self, fields):
        return {"weight": fields["q"], "weight_scale": fields["scale"]}

    def from_stored(self, tensors):
        return {"q": tensors["weight"], "scale": tensors["weight_scale"]}


class Int6Dense(linear.LinearFormat):
    """Runs int6 by dequantizing once at build (a toy: no memory saved at run time)."""

    name, quantization = "int6-dense", "int6"

    @classmethod
    def unavailable(cls, dtype, device):
        return None

    def _build(self, q, scale):
        self.register_buffer("q", q.contiguous(), persistent=False)
        self.register_buffer("scale", scale.float().contiguous(), persistent=False)

    def fields(self):
        return {"q": self.q, "scale": self.scale}

    def dense_weight(self):
        return Int6Rows().dequantize(self.fields(), self.compute_dtype)

    def matmul(self, x):
        return F.linear(x, self.dense_weight())


def test_a_new_scheme_is_one_class_and_a_format(tmp_path, monkeypatch):
    monkeypatch.setitem(schemes.SCHEMES, "int6", Int6Rows())
    monkeypatch.setitem(linear.FORMATS, "int6-dense", Int6Dense)
    tiny_checkpoint(tmp_path / "dense")
    ids = torch.tensor([[5, 9, 11, 4, 7]])
    dense = stablelm.AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    model = stablelm.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization="int6")
    assert model.inference_kind == "int6-dense" and model.quantization == "int6"
    with torch.no_grad():
        want, got = dense(ids).logits, model(ids).logits
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    model.save_pretrained(tmp_path / "int6")
    config = json.loads((tmp_path / "int6" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "stablelm-weight-only", "scheme": "int6", "bits": 6}
    again = stablelm.AutoModelForCausalLM.from_pretrained(tmp_path / "int6")
    assert again.inference_kind == "int6-dense"
    with torch.no_grad():
        assert torch.equal(again(ids).logits, got)
    assert torch.equal(again.generate(ids, max_new_tokens=4, do_sample=False),
                       model.generate(ids, max_new_tokens=4, do_sample=False))
