"""MemoryAgentBench / MemoryBench text metrics, worked by hand."""

import pytest

from membuilder.metrics_text import (
    exact_match,
    normalize_answer,
    recall_at_k,
    rouge_l,
    score,
    split_items,
    substring_exact_match,
    token_f1,
)


def test_normalize():
    assert normalize_answer("The  Eiffel-Tower, in PARIS!") == "eiffeltower in paris"


def test_exact_and_substring_match_best_over_aliases():
    assert exact_match("the Lyon.", ["Paris", "Lyon"]) == 1.0
    assert exact_match("Lyon, France", "Lyon") == 0.0
    assert substring_exact_match("She lives in Lyon, France now", ["Marseille", "lyon france"]) == 1.0
    assert substring_exact_match("in 2010", "10") == 0.0  # whole tokens only


def test_token_f1_by_hand():
    # pred "a red car parked" -> [red, car, parked]; gold "the red car" -> [red, car]
    # common 2: P = 2/3, R = 2/2, F1 = 2*(2/3)*1/(2/3+1) = 0.8
    assert token_f1("a red car parked", "the red car") == pytest.approx(0.8)
    assert token_f1("blue", ["red", "blue"]) == 1.0
    assert token_f1("", "x") == 0.0


def test_rouge_l_by_hand():
    # pred [police, killed, gunman]; ref [police, kill, gunman]: LCS = [police, gunman] = 2
    # P = 2/3, R = 2/3, F = 2/3
    assert rouge_l("police killed the gunman", "police kill the gunman") == pytest.approx(2 / 3)
    # pred "x b c", ref "b y c z" -> LCS [b, c] = 2; P = 2/3, R = 2/4, F = 2*(1/3)/(7/6) = 4/7
    assert rouge_l("x b c", "b y c z") == pytest.approx(4 / 7)
    assert rouge_l("nothing", "else") == 0.0


def test_recall_at_5_by_hand():
    pred = "1. Inception\n2. Heat\n3. Alien, Up\n- Jaws\n6. Titanic"
    assert split_items(pred) == ["Inception", "Heat", "Alien", "Up", "Jaws", "Titanic"]
    # gold {heat, titanic, up}: top-5 holds heat and up, not titanic (6th) -> 2/3
    assert recall_at_k(pred, ["Heat", "Titanic", "Up"], k=5) == pytest.approx(2 / 3)
    assert score("recall@5", pred, ["Titanic"]) == 0.0
    with pytest.raises(ValueError, match="unknown metric"):
        score("bleu", "a", "a")
