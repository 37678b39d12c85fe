"""Behaviours: presets, splits, scorers, and each preset end to end through capture → directions."""

import pytest
import torch

import hereticlab as hl
from hereticlab.measure.behaviours import (
    BEHAVIOURS,
    Behaviour,
    LengthScorer,
    PhraseScorer,
    get_behaviour,
    read_list,
    register,
    word_count,
)

PRESETS = ("refusal", "slop", "humour", "verbosity")


def test_registry_and_interface():
    assert set(PRESETS) <= set(BEHAVIOURS)
    assert get_behaviour("humor").name == "humour"
    with pytest.raises(KeyError, match="available"):
        get_behaviour("sarcasm")
    for name in PRESETS:
        b = get_behaviour(name)
        assert isinstance(b, Behaviour) and b.name == name
        assert b.count in ("present", "mean") and b.max_new_tokens > 0
        assert b.early_stop_safe == (name != "verbosity")


@pytest.mark.parametrize("name", PRESETS)
def test_pairs_are_disjoint_reproducible_and_big_enough(name):
    b = get_behaviour(name)
    bad_train, good_train = b.train_pair(0)
    bad_eval, good_eval = b.eval_pair(0)
    assert len(bad_train) >= 100 and len(good_train) >= 100 and len(bad_eval) >= 50 and len(good_eval) >= 50
    for train, evaluation in ((bad_train, bad_eval), (good_train, good_eval)):
        assert not set(train) & set(evaluation)
    # no eval question is a training question of either class (style presets may add a request after the "?")
    stem = lambda prompts: {p.split("? ")[0] for p in prompts}  # noqa: E731
    assert not (stem(bad_eval) | stem(good_eval)) & (stem(bad_train) | stem(good_train))
    assert b.train_pair(0)[0].prompts == bad_train.prompts and b.train_pair(1)[0].prompts != bad_train.prompts
    if name != "refusal":
        assert [stem([p]) for p in bad_train] == [stem([p]) for p in good_train]  # the same questions, paired
        assert bad_train.system_prompt != good_train.system_prompt
        assert bad_eval.system_prompt == bad_train.system_prompt


def test_shipped_lists_are_big_and_clean():
    questions = read_list("questions.txt")
    assert len(questions) >= 100 and len(set(questions)) == len(questions)
    assert len(read_list("slop_phrases.txt")) >= 50 and len(read_list("humour_cues.txt")) >= 40


def test_scores_rank_handwritten_examples():
    florid = (
        "Let's delve into the rich tapestry of bread, a testament to human ingenuity. In the realm of baking, "
        "yeast plays a pivotal role in this vibrant dance of chemistry."
    )
    plain = "Yeast eats sugar and releases carbon dioxide. The gas gets trapped in the dough, so it rises."
    jokey = "Haha, great question! 😂 Why did the bread go to therapy? It kneaded help. Pun intended!"
    serious = "Bread rises because yeast produces carbon dioxide during fermentation."
    slop, humour, verbosity, refusal = (get_behaviour(n) for n in PRESETS[1:] + PRESETS[:1])
    assert slop.score([florid])[0] > 20 and slop.score([plain]) == [0.0]
    assert slop.is_present([florid, plain]) == [True, False]
    assert humour.score([jokey])[0] > 10 and humour.score([serious]) == [0.0]
    assert humour.is_present([jokey, serious]) == [True, False]
    assert verbosity.score([plain]) == [float(word_count(plain))] == [17.0]
    assert verbosity.is_present(["word " * 80, plain]) == [True, False]
    assert verbosity.measure(["a b", "a b c d"]) == 3.0
    assert refusal.score(["I'm sorry, I can't help.", "Sure."]) == [1.0, 0.0]
    assert refusal.measure(["I'm sorry, I can't help.", "Sure.", ""]) == 2.0
    # reasoning blocks do not count
    assert slop.score(["<think>delve tapestry testament</think>Plain answer."]) == [0.0]


def test_phrase_matching_uses_a_leading_word_boundary_only():
    scorer = PhraseScorer(["delve", "pun intended", "😂"], min_hits=1, per_words=None)
    assert scorer.score(["She delves deep.", "Shedelve", "a pun intended here", "lol 😂😂"]) == [1.0, 0.0, 1.0, 2.0]
    assert LengthScorer(3).present(["one two", "one two three"]) == [False, True]


@pytest.mark.parametrize("name", ["refusal", "slop", "humour"])
def test_decided_is_monotone(name):
    b = get_behaviour(name)
    texts = [
        "I'm sorry, I can't do that. " * 2,
        "A vibrant tapestry, a testament to delving.",
        "Haha 😂 why did the joke cross the road? lol",
        "<think>I cannot haha tapestry delve",
        "",
        "Plain.",
    ]
    for text in texts:
        for cut in range(len(text) + 1):
            if b.decided([text[:cut]])[0]:
                assert b.is_present([text])[0] and b.is_present([text[:cut] + " and then more words"])[0]
    assert b.decided([""]) == [False]


def test_custom_behaviour_and_register():
    bad = hl.load_prompts(["Shout about cats", "Shout about dogs", "Shout about fish"])
    good = hl.load_prompts(["Talk about cats", "Talk about dogs", "Talk about fish"])
    loud = Behaviour(
        "shouting",
        bad,
        good,
        scorer=lambda t: [float(x.isupper()) for x in t],
        decider=lambda t: [x.isupper() for x in t],
        n_train=2,
    )
    register(loud)
    try:
        b = get_behaviour("shouting")
        assert len(b.train_pair(0)[0]) == 2 and len(b.eval_pair(0)[1]) == 1
        assert b.measure(["HEY", "hey"]) == 1.0 and b.decided(["HEY"]) == [False]
    finally:
        BEHAVIOURS.pop("shouting")
    with pytest.raises(ValueError, match="early_stop_safe"):
        Behaviour("x", bad, good, scorer=len, decider=len, early_stop_safe=True)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_end_to_end_capture_directions_generate(name, tiny_llama):
    model, tok = tiny_llama
    b = get_behaviour(name)
    bad_train, good_train = b.train_pair(0)
    bad, good = bad_train[:6], good_train[:6]
    r_bad = hl.capture_residuals(model, tok, bad, progress=False)
    r_good = hl.capture_residuals(model, tok, good, progress=False)
    directions = hl.mean_difference(r_bad, r_good)
    n_layers = len(hl.find_layers(model))
    assert directions.vectors.shape == (n_layers + 1, model.config.hidden_size)
    assert torch.isfinite(directions.vectors).all() and directions.vectors[1:].norm(dim=-1).min() > 0
    if name != "refusal":  # same questions: the direction comes from the system prompts alone
        plain = hl.capture_residuals(model, tok, list(bad), progress=False)
        assert not torch.allclose(plain, r_bad)
    bad_eval, _ = b.eval_pair(0)
    texts = hl.generate(model, tok, bad_eval[:3], max_new_tokens=4, progress=False)
    scores, present = b.score(texts), b.is_present(texts)
    assert len(scores) == len(present) == 3 and all(isinstance(s, float) for s in scores)
    assert isinstance(b.measure(texts), float)


def test_refusal_behaviour_carries_what_the_runner_needs():
    from hereticlab.measure.metrics import MarkerDetector

    b = get_behaviour("refusal")
    assert isinstance(b.detector, MarkerDetector) and b.early_stop_safe and not b.objective_is_mean
    assert len(b.bad) and len(b.good) and b.max_new_tokens == 48
    assert b.decided(["I cannot help with that", "", "<think>I cannot"]) == [True, False, False]
    assert b.is_present(["I cannot help with that", "", "Sure!"]) == [True, True, False]
    assert get_behaviour("verbosity").objective_is_mean and get_behaviour("verbosity").detector is None


def test_run_settings_lengths_and_log_names():
    """Refusal takes a run's prompts, split and lengths (run_settings); the style presets bring their own."""
    refusal, slop = get_behaviour("refusal"), get_behaviour("slop")
    assert refusal.run_settings and not any(get_behaviour(n).run_settings for n in PRESETS[1:])
    assert (refusal.counted, refusal.label) == ("refusals", "refusals")
    assert (slop.counted, slop.label) == ("responses with slop", "slop")
    for b in (refusal, slop):  # decide_after / final_new_tokens default to the cap
        assert b.search_decide_after == b.report_new_tokens == b.max_new_tokens
    short = refusal.with_sets(decide_after=4, max_new_tokens=100, final_new_tokens=64, n_train=12)
    assert (short.search_decide_after, short.max_new_tokens, short.report_new_tokens) == (4, 100, 64)
    assert len(short.train_pair(0)[0]) == 12 and short.train_pair(0)[0].prompts == (
        hl.load_prompts("harmful").split(train=12, seed=0)[0].prompts
    )


def test_refusal_behaviour_judges_like_its_marker_detector():
    from hereticlab.measure.metrics import MarkerDetector

    texts = [
        "I'm sorry, I can't help.",
        "Sure, here it is.",
        "",
        "<think>I cannot</think>Sure.",
        "<think>hmm",
        "As an AI",
    ]
    markers, refusal = MarkerDetector(), get_behaviour("refusal")
    assert refusal.is_present(texts) == markers(texts) == markers.detect(texts).decisions
    assert refusal.decided(texts) == [bool(markers.decided(t)) for t in texts]
    assert refusal.score(texts) == markers.detect(texts).scores
    assert [markers.is_refusal(t) for t in texts] == markers(texts)  # the 0.1 aliases still agree
    assert [markers.matched(t) for t in texts] == [bool(markers.decided(t)) for t in texts]
