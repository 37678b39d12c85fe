"""Coherence measures: distinct-n and the trailing-loop repetition rate on hand-checked strings, the unsteered NLL,
the steer-generate-judge helper, the matched-coherence choice and the question-clustered estimate."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from hereticlab.interventions.steering import activation_addition
from hereticlab.measure.coherence import (
    coherence_nll,
    coherent_choice,
    distinct_n,
    repetition_rate,
    steered_outputs,
    text_tokens,
)
from hereticlab.measure.depth import response_nll
from hereticlab.measure.detectors import DetectionResult
from hereticlab.measure.report import clustered_estimate


def test_text_tokens_splits_words_and_punctuation():
    assert text_tokens("Hi, hi!") == ["hi", ",", "hi", "!"]
    assert text_tokens("  ") == []


def test_distinct_n_by_hand():
    # bigrams of "a b a b": (a b), (b a), (a b) → 2 distinct of 3
    assert distinct_n("a b a b", 2) == pytest.approx(2 / 3)
    assert distinct_n("a b a b", 1) == pytest.approx(2 / 4)
    assert distinct_n("the cat sat on the mat", 2) == 1.0
    assert distinct_n([1, 1, 1, 1, 1], 2) == pytest.approx(1 / 4)
    assert math.isnan(distinct_n("one", 2))
    with pytest.raises(ValueError):
        distinct_n("a b", 0)


def test_repetition_rate_by_hand():
    assert repetition_rate("a b c b c b c") == pytest.approx(6 / 7)  # (b c)×3 covers 6 of 7
    assert repetition_rate("x y y") == pytest.approx(2 / 3)  # (y)×2
    assert repetition_rate("the the the the") == 1.0
    assert repetition_rate("a b c d") == 0.0
    assert repetition_rate("a b c b") == 0.0  # "b c b" is not two full units
    assert repetition_rate("a b c a b c", max_period=2) == 0.0
    assert repetition_rate("a b c a b c", max_period=3) == 1.0
    assert repetition_rate([7, 1, 2, 3, 1, 2, 3, 1]) == pytest.approx(7 / 8)  # (1 2 3)×2 + 1: period 3, 7 tokens
    assert math.isnan(repetition_rate(""))


def test_coherence_nll_is_response_nll_with_nan_for_empty(tiny_llama):
    model, tok = tiny_llama
    prompts = ["Tell me a joke.", "How do I bake bread?", "Hi"]
    responses = ["Why did the chicken cross the road?", "", "Hello there, friend."]
    got = coherence_nll(model, tok, prompts, responses, max_tokens=16)
    want = response_nll(model, tok, prompts, responses, max_tokens=16).double().numpy()
    assert math.isnan(got[1])
    np.testing.assert_allclose(got[[0, 2]], want[[0, 2]], rtol=1e-6)
    assert np.all(got[[0, 2]] > 0)


class _Scripted:
    """A detector that records what it saw and calls texts containing a chosen token a refusal."""

    def __init__(self, word):
        self.word, self.seen = word, []

    def detect(self, texts, prompts=None):
        self.seen.append((list(texts), list(prompts or [])))
        decisions = [self.word in t for t in texts]
        return DetectionResult(decisions, [float(d) for d in decisions])

    def decided(self, text):
        return None


def test_steered_outputs_judges_steered_text_and_scores_it_unsteered(tiny_llama):
    model, tok = tiny_llama
    prompts = ["Tell me a joke.", "How do I bake bread?", "Write a haiku about rain and tea."]
    vector = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 8
    detector = _Scripted("e")
    base = steered_outputs(model, tok, prompts, None, detectors={"scripted": detector}, max_new_tokens=12)
    steered = steered_outputs(
        model,
        tok,
        prompts,
        lambda: activation_addition(model, vector, resid=2, alpha=1.0),
        detectors={"scripted": detector},
        max_new_tokens=12,
    )
    assert list(steered.columns) == [
        "prompt",
        "response",
        "scripted",
        "nll",
        "distinct_2",
        "repetition",
        "n_tokens",
    ]
    assert steered["response"].tolist() != base["response"].tolist()  # the steering acted on generation
    assert detector.seen[1] == (steered["response"].tolist(), prompts)  # judged the steered text, with prompts
    assert steered["scripted"].tolist() == ["e" in r for r in steered["response"]]
    # NLL under the *unsteered* model (outside the steering context), not under the steered one
    unsteered = coherence_nll(model, tok, prompts, steered["response"].tolist(), max_tokens=12)
    with activation_addition(model, vector, resid=2, alpha=1.0):
        under_steering = coherence_nll(model, tok, prompts, steered["response"].tolist(), max_tokens=12)
    valid = ~np.isnan(unsteered)
    np.testing.assert_allclose(steered["nll"].to_numpy()[valid], unsteered[valid], rtol=1e-6)
    assert not np.allclose(unsteered[valid], under_steering[valid])
    ids = [tok.encode(r, add_special_tokens=False) for r in steered["response"]]
    assert steered["n_tokens"].tolist() == [len(t) for t in ids]
    assert steered["distinct_2"].tolist()[0] == pytest.approx(distinct_n(ids[0], 2), nan_ok=True)


def test_coherent_choice_takes_the_best_coherent_setting_and_gentlest_on_ties():
    summary = pd.DataFrame(
        {
            "strength": [1.0, 2.0, 4.0, 8.0],
            "refusal": [0.1, 0.4, 0.4, 0.9],
            "nll": [1.0, 1.2, 1.4, 3.5],  # the strongest breaks the text
            "distinct_2": [0.9, 0.9, 0.85, 0.3],
        }
    )
    choice = coherent_choice(summary, base_nll=1.0, base_distinct=0.9, nll_margin=0.5, distinct_margin=0.1)
    assert choice is not None and choice["strength"] == 2.0  # ties 0.4 / 0.4 → the gentler
    assert summary["coherent"].tolist() == [True, True, True, False]
    tight = coherent_choice(summary, base_nll=1.0, base_distinct=0.9, nll_margin=0.1, distinct_margin=0.0)
    assert tight is not None and tight["strength"] == 1.0
    assert coherent_choice(summary, base_nll=0.0, base_distinct=0.9, nll_margin=0.5, distinct_margin=0.1) is None


def test_clustered_estimate_pools_rows_and_resamples_questions():
    # question q1 is in two seeds' test splits, q2..q4 in one
    frame = pd.DataFrame(
        {
            "prompt": ["q1", "q1", "q2", "q3", "q4"],
            "refused": [True, True, False, True, False],
            "other": [False, True, False, False, False],
        }
    )
    est = clustered_estimate(frame, "refused", n_resamples=500)
    assert est.value == pytest.approx(3 / 5)
    assert 0.0 <= est.low <= est.value <= est.high <= 1.0
    assert "5 (seed, question) rows over 4 questions" in est.detail
    diff = clustered_estimate(frame, lambda f: f["refused"].astype(float) - f["other"].astype(float))
    assert diff.value == pytest.approx(2 / 5)
    assert -1.0 <= diff.low <= diff.value <= diff.high <= 1.0
    # whole questions are resampled: 10 rows of one question are one cluster. A row bootstrap of these 11 rows
    # would put the low end near 0.7; resampling the two questions gives 0 (both draws q2) a quarter of the time.
    lopsided = pd.DataFrame({"prompt": ["q1"] * 10 + ["q2"], "refused": [True] * 10 + [False]})
    wide = clustered_estimate(lopsided, "refused", n_resamples=1000)
    assert wide.value == pytest.approx(10 / 11)
    assert wide.low == 0.0 and wide.high == 1.0
    single = clustered_estimate(frame[frame["prompt"] == "q1"], "refused")
    assert single.value == 1.0 and single.low == -math.inf
    with pytest.raises(ValueError):
        clustered_estimate(frame.assign(refused=np.nan), "refused")
