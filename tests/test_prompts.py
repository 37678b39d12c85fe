import pytest

import hereticlab as hl


def test_named_sets_have_at_least_200_prompts():
    for name in ("harmful", "harmless"):
        assert len(hl.load_prompts(name)) >= 200


def test_split_is_disjoint_and_reproducible():
    harmful = hl.load_prompts("harmful")
    train, evaluation = harmful.split(train=200)
    assert len(train) == 200 and len(evaluation) == len(harmful) - 200
    assert not set(train) & set(evaluation)
    again, _ = harmful.split(train=200)
    assert again.prompts == train.prompts
    other, _ = harmful.split(train=200, seed=1)
    assert other.prompts != train.prompts


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(hl.PromptError, match="does not exist"):
        hl.load_prompts(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n")
    with pytest.raises(hl.PromptError, match="no prompts"):
        hl.load_prompts(empty)
    with pytest.raises(hl.PromptError, match="no prompt set named"):
        hl.load_prompts("nonexistent_set")
    with pytest.raises(hl.PromptError, match="cannot split"):
        hl.load_prompts(["a", "b"]).split(train=2)
    with pytest.raises(hl.PromptError, match="not installed"):
        hl.load_prompts("no_such_pkg_xyz:data/x.txt")


def test_load_from_file_and_list(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("first\n\nsecond\n")
    assert hl.load_prompts(f).prompts == ("first", "second")
    assert hl.load_prompts(["x"], system_prompt="sys").system_prompt == "sys"


def test_chat_formatting_options():
    from hereticlab.core.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    plain = hl.format_chat(tok, ["hi"])[0]
    assert plain.endswith("<|im_start|>assistant\n") and "hi" in plain
    sys = hl.format_chat(tok, ["hi"], system_prompt="Be brief.", response_prefix="Sure,")[0]
    assert sys.startswith("<|im_start|>system\nBe brief.") and sys.endswith("Sure,")
    assert hl.format_chat(tok, ["hi"], close_thinking=True)[0].endswith("<think>\n\n</think>\n\n")


def test_packaged_prompt_folder_mirrors_the_repository():
    """Wheels ship ``hereticlab/data/prompts`` (a link to ``prompts/`` in the source tree): it must resolve."""
    from pathlib import Path

    from hereticlab.core.prompts import PROMPTS_DIR

    repo = Path(__file__).resolve().parents[1] / "prompts"
    for name in ("harmful.txt", "harmless.txt", "behaviours/questions.txt", "personas/refusal.txt"):
        assert (PROMPTS_DIR / name).read_text() == (repo / name).read_text()
