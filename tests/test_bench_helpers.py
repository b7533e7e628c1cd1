"""The arithmetic of bench/precision_forward.py's gradient comparison, on hand-computed tensors."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from precision_forward import KINDS, kind, mean_errors, relative_errors  # noqa: E402

from model import Transformer, load_preset  # noqa: E402


def test_every_parameter_of_the_model_has_a_kind():
    kinds = {kind(name) for name, _ in Transformer(load_preset("tiny")).named_parameters()}
    assert kinds == set(KINDS)


def test_relative_errors_match_a_hand_computation():
    ref = {"layers.0.self_attn.q_a_proj.weight": torch.tensor([3.0, 4.0]), "lm_head.weight": torch.tensor([0.0, 12.0])}
    grad = {"layers.0.self_attn.q_a_proj.weight": torch.tensor([3.0, 5.0]), "lm_head.weight": torch.tensor([0.0, 9.0])}
    e = relative_errors(grad, ref)
    assert e["attention"] == pytest.approx(1 / 5)  # ||(0, 1)|| / ||(3, 4)||
    assert e["head"] == pytest.approx(3 / 12)
    assert e["all"] == pytest.approx((1 + 9) ** 0.5 / 13)  # sqrt(1 + 9) / sqrt(25 + 144)
    assert mean_errors([grad, ref], [ref, ref])["head"] == pytest.approx(3 / 24)


def test_machine_line_names_the_cpu_and_its_bf16_units():
    from machine import bf16_units, parse_cpuinfo
    text = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\n"
            "flags\t\t: fpu avx2 avx512_bf16 amx_bf16 amx_tile\n\n"
            "processor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n")
    model, flags = parse_cpuinfo(text)
    assert model == "Intel(R) Xeon(R) Platinum 8481C" and "amx_tile" in flags and "fpu" in flags
    assert bf16_units(flags) == "amx_bf16, avx512_bf16"
    assert bf16_units({"fpu", "avx2"}) == "none (avx2)"
