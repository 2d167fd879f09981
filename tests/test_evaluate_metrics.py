"""evaluate's metrics and floors on hand-made records (no model)."""

from __future__ import annotations

import math

import pytest
import torch

from llava_pipeline.base.errors import PipelineError
from llava_pipeline.runtime import evaluate

V = 8


def _record(qtype, answer, text, ids, logits):
    logp = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), dim=-1)
    top = logp.topk(4, dim=-1)
    return {
        "image": "a",
        "qtype": qtype,
        "question": "q",
        "answer": answer,
        "text": text,
        "ids": ids,
        "logp": [float(logp[i, t]) for i, t in enumerate(ids)],
        "top_ids": top.indices.tolist(),
        "top_logp": top.values.tolist(),
    }, logp


def _answer(text):
    return evaluate.Answer(text, 0.01, 0.02, 10, 3, 0.02)


def test_identical_program_scores_perfectly():
    logits = [[5.0, 1, 0, 0, 0, 0, 0, 0], [0, 0, 6.0, 1, 0, 0, 0, 0]]
    rec, logp = _record("count", "two", "two", [0, 2], logits)
    m = evaluate.quality_metrics([rec], [_answer("two")], [logp.float()], {"text_decoder": 2 << 20})
    assert m["accuracy"] == {"count": 1.0} and m["ref_accuracy"] == {"count": 1.0}
    assert m["agreement"] == 1.0 and m["top1"] == 1.0
    assert m["kl"] == pytest.approx(0.0, abs=1e-5)
    assert m["ppl"] == pytest.approx(m["ref_ppl"], abs=1e-3)
    assert m["size_mb"] == {"text_decoder": 2.0}


def test_kl_matches_the_full_sum_when_top_k_holds_the_mass():
    p = torch.log_softmax(torch.tensor([8.0, 7.0, 6.0, 5.0, -20, -20, -20, -20]), dim=-1)
    q = torch.log_softmax(torch.tensor([7.0, 8.0, 6.0, 4.0, -20, -20, -20, -20]), dim=-1)
    full = float((p.exp() * (p - q)).sum())
    top = p.topk(4)
    assert evaluate._kl_top_k(top.indices.tolist(), top.values.tolist(), q) == pytest.approx(full, rel=1e-4)


def test_kl_lumps_the_tail_into_one_bucket():
    p = torch.log_softmax(torch.tensor([2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]), dim=-1)
    q = torch.log_softmax(torch.tensor([1.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]), dim=-1)
    top = p.topk(1)
    p0, q0 = float(p[0].exp()), float(q[0].exp())
    expected = p0 * math.log(p0 / q0) + (1 - p0) * math.log((1 - p0) / (1 - q0))
    assert evaluate._kl_top_k(top.indices.tolist(), top.values.tolist(), q) == pytest.approx(expected, rel=1e-6)


def test_wrong_answers_lower_accuracy_agreement_and_top1():
    ref_logits = [[5.0, 1, 0, 0, 0, 0, 0, 0]]
    rec_a, logp_a = _record("count", "one", "one", [0], ref_logits)
    rec_b, logp_b = _record("left", "circle", "square", [0], ref_logits)
    bad = torch.log_softmax(torch.tensor([[0.0, 5, 0, 0, 0, 0, 0, 0]]), dim=-1)
    m = evaluate.quality_metrics([rec_a, rec_b], [_answer("two"), _answer("square")], [bad, logp_b.float()], {})
    assert m["accuracy"] == {"count": 0.0, "left": 0.0}
    assert m["ref_accuracy"] == {"count": 1.0, "left": 0.0}
    assert m["agreement"] == 0.5 and m["top1"] == 0.5
    assert m["kl"] > 1.0 and m["ppl"] > m["ref_ppl"]


def test_no_right_answers_no_accuracy():
    rec, logp = _record("question", None, "a cat", [1], [[0, 4.0, 0, 0, 0, 0, 0, 0]])
    m = evaluate.quality_metrics([rec], [_answer("a cat")], [logp.float()], {})
    assert "accuracy" not in m and m["agreement"] == 1.0
    assert "accuracy" not in evaluate.summary(m)


@pytest.mark.parametrize(
    "floors, needle",
    [
        (evaluate.Floors(min_accuracy=0.9), "accuracy.left = 0.5 is below evaluate.min_accuracy = 0.9"),
        (evaluate.Floors(min_agreement=0.8), "agreement = 0.7 is below evaluate.min_agreement = 0.8"),
        (evaluate.Floors(min_top1=0.99), "top1 = 0.95 is below evaluate.min_top1 = 0.99"),
        (evaluate.Floors(max_kl=0.01), "kl = 0.02 is above evaluate.max_kl = 0.01"),
    ],
)
def test_floors_name_metric_value_and_floor(floors, needle):
    metrics = {"accuracy": {"count": 1.0, "left": 0.5}, "agreement": 0.7, "top1": 0.95, "kl": 0.02}
    with pytest.raises(PipelineError) as e:
        evaluate.check_floors(metrics, floors)
    assert str(e.value) == needle


def test_floors_pass_at_the_floor():
    metrics = {"accuracy": {"count": 0.9}, "agreement": 0.8, "top1": 0.99, "kl": 0.01}
    evaluate.check_floors(metrics, evaluate.Floors(0.9, 0.8, 0.99, 0.01))


def test_speed_metrics_medians_and_rates():
    answers = [
        evaluate.Answer("x", 0.1, 0.5, 10, 5, 0.4),
        evaluate.Answer("y", 0.3, 0.5, 10, 1, 0.0),
        evaluate.Answer("z", 0.2, 1.0, 20, 3, 0.2),
    ]
    s = evaluate.speed_metrics(answers)
    assert s == {"image_encode_s": 0.2, "prefill_tok_s": 20.0, "decode_tok_s": 10.0}
