"""Dataset loaders: the real files in ../shared/data (skipped when absent), small hand-written
samples for the conventions and for malformed input, and the PerLTQA fixture."""

import collections
import copy
import gzip
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from membuilder.datasets import (
    DATASET_NAMES,
    LOCOMO_MAIN_CATEGORIES,
    NOT_ANSWERABLE,
    DatasetFormatError,
    SplitLeakageError,
    check_split_leakage,
    default_data_dir,
    load_dataset,
    load_locomo,
    load_longmemeval,
    load_longmemeval_splits,
    load_perltqa,
    longmemeval_base_id,
    parse_locomo_datetime,
    parse_loose_date,
    parse_longmemeval_datetime,
    split_longmemeval_ids,
)

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
LOCOMO = DATA / "locomo" / "locomo10.json"
LME_ORACLE = DATA / "longmemeval" / "longmemeval_oracle_dev.json.gz"
LME_S = DATA / "longmemeval" / "longmemeval_s_dev.json.gz"
SPLITS = DATA / "longmemeval" / "splits_dev.json"
FIXTURES = Path(__file__).parent / "fixtures"


def need(path: Path):
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared benchmark data folder is not on this machine)")


@pytest.fixture(scope="module")
def locomo():
    need(LOCOMO)
    return load_locomo(LOCOMO)


@pytest.fixture(scope="module")
def lme_oracle():
    need(LME_ORACLE)
    return load_longmemeval(LME_ORACLE)


@pytest.fixture(scope="module")
def lme_s():
    need(LME_S)
    return load_longmemeval(LME_S)


# --- LoCoMo, real file --------------------------------------------------------------------------


def test_locomo_counts(locomo):
    # the figures published for locomo10.json (and in ../shared/data/README.md)
    assert len(locomo) == 10
    assert sum(len(c.sessions) for c in locomo) == 272
    assert sum(c.num_turns for c in locomo) == 5882
    questions = [q for c in locomo for q in c.questions]
    assert len(questions) == 1986
    per_cat = collections.Counter(q.category for q in questions)
    assert per_cat == {"multi-hop": 282, "temporal": 321, "open-domain": 96, "single-hop": 841, "adversarial": 446}
    assert sum(1 for q in questions if q.category in LOCOMO_MAIN_CATEGORIES) == 1540
    adversarial = [q for q in questions if q.is_adversarial]
    assert len(adversarial) == 446
    # 444 adversarial items have no gold answer; 2 carry "No"
    assert sum(q.is_abstention for q in adversarial) == 444
    assert {q.answer for q in adversarial if not q.is_abstention} == {"No"}
    assert all(q.answer == NOT_ANSWERABLE and q.adversarial_answer for q in adversarial if q.is_abstention)
    assert not any(q.is_abstention for q in questions if not q.is_adversarial)


def test_locomo_sessions_dates_and_captions(locomo):
    conv26 = locomo[0]
    assert conv26.conversation_id == "conv-26"
    # 35 date keys but 19 sessions: only sessions actually present, in numeric order
    assert [s.session_id for s in conv26.sessions] == [f"session_{n}" for n in range(1, 20)]
    assert conv26.sessions[0].date == datetime(2023, 5, 8, 13, 56)  # "1:56 pm on 8 May, 2023"
    assert all(s.date is not None for c in locomo for s in c.sessions)
    captioned = [m for c in locomo for s in c.sessions for m in s.messages if m.image_caption]
    assert len(captioned) == 1226  # turns with a blip_caption in the file
    assert all(m.text.endswith(f"[shares an image: {m.image_caption}]") for m in captioned)
    d15 = conv26.sessions[0].messages[4]
    assert d15.turn_id == "D1:5" and d15.text == (
        "The transgender stories were so inspiring! I was so happy and thankful for all the support. "
        "[shares an image: a photo of a dog walking past a wall with a painting of a woman]")


def test_locomo_roles_follow_speaker_fields(locomo):
    raw = json.loads(LOCOMO.read_text())
    for conv, sample in zip(locomo, raw):
        a, b = sample["conversation"]["speaker_a"], sample["conversation"]["speaker_b"]
        assert conv.speakers == (a, b)
        roles = {(m.speaker, m.role) for s in conv.sessions for m in s.messages}
        assert roles == {(a, "user"), (b, "assistant")}


def test_locomo_roles_do_not_depend_on_hash_seed():
    need(LOCOMO)
    # REFERENCE item 12: the paper's converter took roles from set order, which changes with
    # PYTHONHASHSEED; ours must give the same roles in any interpreter
    code = ("import json,sys; from membuilder.datasets import load_locomo; "
            "cs = load_locomo(sys.argv[1]); "
            "print(json.dumps([[c.conversation_id, s.messages[0].speaker, s.messages[0].role] "
            "for c in cs for s in c.sessions[:2]]))")
    outs = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        res = subprocess.run([sys.executable, "-c", code, str(LOCOMO)], capture_output=True, text=True,
                             env=env, cwd=Path(__file__).resolve().parents[2], check=True)
        outs.add(res.stdout)
    assert len(outs) == 1


def test_locomo_evidence_and_annotations(locomo):
    by_id = {q.question_id: q for c in locomo for q in c.questions}
    assert by_id["conv-26/q37"].evidence == ("D8:6", "D9:17")  # was "D8:6; D9:17"
    assert by_id["conv-26/q37"].evidence_sessions == ("session_8", "session_9")
    assert by_id["conv-42/q88"].evidence == ("D1:18", "D1:20")  # a bare "D" dropped
    assert "D11:26" in by_id["conv-43/q18"].evidence  # was "D:11:26"
    assert by_id["conv-26/q1"].answer == "2022"  # an int in the file
    for c in locomo:
        assert [a.session_id for a in c.annotations] == [s.session_id for s in c.sessions]
    assert sum(len(a.observations) for c in locomo for a in c.annotations) == 2541
    assert sum(len(a.events) for c in locomo for a in c.annotations) == 669
    first = locomo[0].annotations[0]
    assert first.date == datetime(2023, 5, 8) and first.date_text == "8 May, 2023"
    assert first.events[0].speaker == "Caroline"
    assert first.observations[0].turn_ids == ("D1:3",)
    conv30 = next(c for c in locomo if c.conversation_id == "conv-30")
    multi = [o for o in conv30.annotations[14].observations if len(o.turn_ids) > 1]
    assert multi[0].turn_ids == ("D15:3", "D15:5")  # a list of ids in the file


# --- LongMemEval, real files --------------------------------------------------------------------


def test_longmemeval_dev_counts(lme_oracle, lme_s):
    assert len(lme_oracle) == 88 and len(lme_s) == 87
    assert {c.conversation_id for c in lme_oracle} - {c.conversation_id for c in lme_s} == {"7e00a6cb"}
    for convs in (lme_oracle, lme_s):
        assert all(len(c.questions) == 1 and c.questions[0].question_id == c.conversation_id for c in convs)
        abstentions = sorted(c.conversation_id for c in convs if c.questions[0].is_abstention)
        assert abstentions == ["19b5f2b3_abs", "2133c1b5_abs", "6456829e_abs"]
    assert collections.Counter(c.questions[0].category for c in lme_oracle) == {
        "multi-session": 33, "temporal-reasoning": 18, "knowledge-update": 15, "single-session-user": 13,
        "single-session-assistant": 6, "single-session-preference": 3}
    assert sum(len(c.sessions) for c in lme_oracle) == 176
    assert sum(len(c.sessions) for c in lme_s) == 4119


def test_longmemeval_sessions_turns_and_evidence(lme_oracle, lme_s):
    raw = json.loads(gzip.open(LME_ORACLE, "rt").read())
    flagged = sum(bool(t.get("has_answer")) for q in raw for s in q["haystack_sessions"] for t in s)
    assert flagged == sum(bool(m.has_answer) for c in lme_oracle for s in c.sessions for m in s.messages)
    for c in lme_oracle:  # the oracle holds only the evidence sessions
        assert set(c.questions[0].evidence_sessions) == {s.session_id for s in c.sessions}
    for c in lme_oracle + lme_s:
        dates = [s.date for s in c.sessions]
        assert dates == sorted(dates) and c.questions[0].question_date is not None
        assert {m.role for s in c.sessions for m in s.messages} <= {"user", "assistant"}
    q0 = lme_oracle[0]
    assert q0.conversation_id == "00ca467f" and q0.questions[0].answer == "2"  # an int in the file
    assert q0.questions[0].question_date == datetime(2023, 3, 27, 15, 58)
    assert q0.sessions[0].messages[0].turn_id == f"{q0.sessions[0].session_id}_1"
    # a session id repeated in one S haystack keeps both copies under distinct ids
    dup = next(c for c in lme_s if c.conversation_id == "1e043500")
    copies = [s for s in dup.sessions if (s.source_id or s.session_id) == "d5d1f9c4"]
    assert [s.session_id for s in copies] == ["d5d1f9c4", "d5d1f9c4/2"]
    assert copies[1].source_id == "d5d1f9c4" and copies[1].messages[0].turn_id == "d5d1f9c4/2_1"
    assert [m.text for m in copies[0].messages] == [m.text for m in copies[1].messages]


def test_longmemeval_splits_file(lme_oracle):
    need(SPLITS)
    splits = load_longmemeval_splits(SPLITS)
    assert (len(splits["sft"]), len(splits["rl"])) == (45, 43)
    assert set(splits["sft"]) | set(splits["rl"]) == {c.conversation_id for c in lme_oracle}
    assert {"2133c1b5", "2133c1b5_abs"} <= set(splits["sft"])
    assert {"19b5f2b3", "19b5f2b3_abs"} <= set(splits["rl"])


def test_load_dataset_defaults_and_hints(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("locomo11")
    monkeypatch.setenv("MEMBUILDER_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match="snap-research/LoCoMo"):
        load_dataset("locomo")
    with pytest.raises(FileNotFoundError, match="xiaowu0162/longmemeval"):
        load_dataset("longmemeval_s")
    with pytest.raises(FileNotFoundError, match="Elvin-Yiming-Du/PerLTQA"):
        load_dataset("perltqa")
    assert len(load_dataset("perltqa", FIXTURES)) == 2  # an explicit path needs no data folder
    monkeypatch.delenv("MEMBUILDER_DATA_DIR")
    need(LME_ORACLE)
    assert "longmemeval_oracle_dev" in DATASET_NAMES
    assert len(load_dataset("longmemeval_oracle_dev")) == 88


# --- split helper -------------------------------------------------------------------------------


def test_split_keeps_twins_hand_example():
    ids = ["a", "a_abs", "b", "c", "c_abs", "d"]
    left, right = split_longmemeval_ids(ids, (0.5, 0.5), seed=0)
    assert sorted(left + right) == sorted(ids)
    for base in ("a", "c"):
        assert (base in left) == (f"{base}_abs" in left)
    assert split_longmemeval_ids(ids, seed=0) == [left, right]  # deterministic
    assert longmemeval_base_id("x_abs") == "x" and longmemeval_base_id("x") == "x"


ids_strategy = st.lists(
    st.tuples(st.text("abcdef0123456789", min_size=1, max_size=6), st.sampled_from(["base", "twin", "abs-only"])),
    max_size=40, unique_by=lambda t: t[0])


@settings(max_examples=150, deadline=None)
@given(ids_strategy, st.sampled_from([(0.5, 0.5), (0.8, 0.2), (1, 1, 1)]), st.integers(0, 10))
def test_split_property(groups, fractions, seed):
    ids = []
    for base, kind in groups:
        ids += {"base": [base], "twin": [base, f"{base}_abs"], "abs-only": [f"{base}_abs"]}[kind]
    sides = split_longmemeval_ids(ids, fractions, seed=seed)
    flat = [i for side in sides for i in side]
    assert sorted(flat) == sorted(set(ids)) and len(flat) == len(set(ids))  # a partition
    side_of = {i: k for k, side in enumerate(sides) for i in side}
    for base, kind in groups:
        if kind == "twin":
            assert side_of[base] == side_of[f"{base}_abs"]
    check_split_leakage({str(k): side for k, side in enumerate(sides)})
    # greedy fill of the side furthest below target: overshoot at most one group (2 ids), so with
    # k sides no side is off its target by more than 2 * (k - 1)
    total = sum(fractions)
    for k, side in enumerate(sides):
        assert abs(len(side) - fractions[k] / total * len(flat)) <= 2 * (len(sides) - 1) + 1e-9


def test_leakage_detected(tmp_path):
    with pytest.raises(SplitLeakageError, match="'x_abs' \\(test\\) shares base id 'x' with train"):
        check_split_leakage({"train": ["x", "y"], "test": ["x_abs"]})
    bad = tmp_path / "splits_bad.json"
    bad.write_text(json.dumps({"sft": ["q1", "q2_abs"], "rl": ["q2"]}))
    with pytest.raises(SplitLeakageError, match="splits_bad.json: base-id leakage"):
        load_longmemeval_splits(bad)
    dupes = tmp_path / "splits_dupes.json"
    dupes.write_text(json.dumps({"sft": ["q1", "q1"]}))
    with pytest.raises(DatasetFormatError, match="splits_dupes.json: 'sft' lists ids more than once"):
        load_longmemeval_splits(dupes)


# --- small hand-written samples: conventions and malformed input ---------------------------------


def locomo_sample():
    return {
        "sample_id": "conv-x",
        "conversation": {
            "speaker_a": "Ann", "speaker_b": "Bob",
            "session_1_date_time": "1:56 pm on 8 May, 2023",
            # Bob speaks first: roles still follow speaker_a / speaker_b
            "session_1": [{"speaker": "Bob", "dia_id": "D1:1", "text": "look", "blip_caption": "a cat on a mat"},
                          {"speaker": "Ann", "dia_id": "D1:2", "text": "cute"}],
            "session_2_date_time": "12:05 am on 9 May, 2023",  # a date key with no session
        },
        "qa": [{"question": "When?", "answer": 2022, "evidence": ["D1:2"], "category": 2},
               {"question": "Bob's dog?", "evidence": ["D1:1"], "category": 5, "adversarial_answer": "Rex"}],
        "observation": {"session_1_observation": {"Bob": [["Bob has a cat.", "D1:1"]]}},
        "event_summary": {"events_session_1": {"Ann": [], "Bob": ["Bob shows his cat."], "date": "8 May, 2023"}},
        "session_summary": {"session_1_summary": "Bob shows a cat."},
    }


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_locomo_small_sample_by_hand(tmp_path):
    (conv,) = load_locomo(write_json(tmp_path / "locomo10.json", [locomo_sample()]))
    (session,) = conv.sessions
    assert session.date == datetime(2023, 5, 8, 13, 56)
    assert [(m.speaker, m.role) for m in session.messages] == [("Bob", "assistant"), ("Ann", "user")]
    assert session.messages[0].text == "look [shares an image: a cat on a mat]"
    q1, q2 = conv.questions
    assert (q1.question_id, q1.answer, q1.category, q1.evidence_sessions) == ("conv-x/q0", "2022", "temporal", ("session_1",))
    assert (q2.answer, q2.is_abstention, q2.is_adversarial, q2.adversarial_answer) == (NOT_ANSWERABLE, True, True, "Rex")
    (ann,) = conv.annotations
    assert ann.observations[0].text == "Bob has a cat." and ann.events[0].text == "Bob shows his cat."
    assert ann.summary == "Bob shows a cat."


def broken(mutate):
    sample = locomo_sample()
    mutate(sample)
    return [sample]


@pytest.mark.parametrize("mutate,message", [
    (lambda s: s["qa"][1].pop("question"), "locomo10.json: sample 0 (conv-x): qa[1]: missing 'question'"),
    (lambda s: s["qa"][0].pop("answer"), "locomo10.json: sample 0 (conv-x): qa[0]: missing 'answer'"),
    (lambda s: s["qa"][0].update(category=7), "qa[0]: category 7 is not one of [1, 2, 3, 4, 5]"),
    (lambda s: s["qa"][0].update(evidence="D1:2"), "qa[0]: 'evidence' is a str, expected list"),
    (lambda s: s["conversation"].update(session_1_date_time="yesterday"),
     "conversation: session_1_date_time 'yesterday' is not like"),
    (lambda s: s["conversation"].pop("session_1_date_time"), "conversation: missing 'session_1_date_time'"),
    (lambda s: s["conversation"]["session_1"][1].update(speaker="Cy"),
     "conversation: session_1[1]: speaker 'Cy' is neither speaker_a nor speaker_b"),
    (lambda s: s["conversation"]["session_1"][0].pop("text"), "session_1[0]: missing 'text'"),
    (lambda s: s["conversation"].pop("speaker_b"), "sample 0 (conv-x): conversation: missing 'speaker_b'"),
    (lambda s: s["observation"]["session_1_observation"]["Bob"].append(["only text"]),
     "observation.session_1_observation.Bob[1]: expected [fact text, turn id(s)]"),
])
def test_locomo_malformed(tmp_path, mutate, message):
    path = write_json(tmp_path / "locomo10.json", broken(mutate))
    with pytest.raises(DatasetFormatError) as info:
        load_locomo(path)
    assert message in str(info.value)


def test_unreadable_files(tmp_path):
    bad = tmp_path / "locomo10.json"
    bad.write_text("[{]")
    with pytest.raises(DatasetFormatError, match="locomo10.json: not valid JSON"):
        load_locomo(bad)
    with pytest.raises(DatasetFormatError, match="expected a list of samples, got dict"):
        load_locomo(write_json(bad, {"sample_id": "x"}))
    with pytest.raises(FileNotFoundError):
        load_locomo(tmp_path / "nope.json")


def lme_item():
    return {
        "question_id": "q1_abs", "question_type": "knowledge-update", "question": "Where do I live now?",
        "answer": "You did not mention this.", "question_date": "2023/06/01 (Thu) 09:00",
        "haystack_session_ids": ["s_late", "s_early"],
        "haystack_dates": ["2023/05/30 (Tue) 23:40", "2023/05/01 (Mon) 08:00"],
        "haystack_sessions": [[{"role": "user", "content": "I moved to Oslo.", "has_answer": True},
                               {"role": "assistant", "content": "Nice!"}],
                              [{"role": "user", "content": "I live in Bergen."}]],
        "answer_session_ids": ["s_late"],
    }


def test_longmemeval_small_sample_json_and_gz(tmp_path):
    plain = write_json(tmp_path / "lme.json", [lme_item()])
    packed = tmp_path / "lme.json.gz"
    with gzip.open(packed, "wt") as fh:
        json.dump([lme_item()], fh)
    (conv,) = load_longmemeval(plain)
    assert load_longmemeval(packed) == [conv]
    assert [s.session_id for s in conv.sessions] == ["s_early", "s_late"]  # sorted by date
    assert [s.session_id for s in load_longmemeval(plain, chronological=False)[0].sessions] == ["s_late", "s_early"]
    late = conv.session("s_late")
    assert [(m.turn_id, m.has_answer) for m in late.messages] == [("s_late_1", True), ("s_late_2", False)]
    (q,) = conv.questions
    assert q.is_abstention and q.category == "knowledge-update" and q.evidence_sessions == ("s_late",)
    assert q.question_date == datetime(2023, 6, 1, 9, 0)


@pytest.mark.parametrize("mutate,message", [
    (lambda q: q.pop("answer"), "lme.json: item 0 (q1_abs): missing 'answer'"),
    (lambda q: q["haystack_dates"].pop(), "haystack_session_ids (2), haystack_dates (1) and haystack_sessions (2) differ"),
    (lambda q: q["haystack_sessions"][1][0].update(role="system"), "haystack_sessions[1][0]: role 'system' is not"),
    (lambda q: q["haystack_sessions"][0][1].pop("content"), "haystack_sessions[0][1]: missing 'content'"),
    (lambda q: q.update(question_date="June 1st"), "question_date 'June 1st' is not like"),
    (lambda q: q["haystack_dates"].__setitem__(0, "2023-05-30"), "haystack_dates[0] '2023-05-30' is not like"),
])
def test_longmemeval_malformed(tmp_path, mutate, message):
    item = lme_item()
    mutate(item)
    with pytest.raises(DatasetFormatError) as info:
        load_longmemeval(write_json(tmp_path / "lme.json", [item]))
    assert message in str(info.value)


# --- PerLTQA fixture ----------------------------------------------------------------------------


def test_perltqa_fixture_by_hand():
    convs = load_perltqa(FIXTURES / "perltmem_sample.json")  # the QA file is found by name
    assert load_perltqa(FIXTURES) == convs  # or from the folder
    lin, omar = convs
    assert lin.conversation_id == "Lin Qiao" and lin.dataset == "perltqa"
    assert lin.speakers == ("Lin Qiao", "Lin Wei", "Grace Park")
    # four sessions: dialogue 1_1_0#1 has two timestamps; sorted by date
    assert [(s.session_id, s.date) for s in lin.sessions] == [
        ("1_1_1#2", datetime(2020, 11, 20, 20, 0)),
        ("1_1_0#1/1", datetime(2021, 3, 10, 9, 15)),
        ("1_1_0#1/2", datetime(2021, 4, 2, 14, 0)),
        ("1_0_0#0", datetime(2022, 6, 3, 18, 30)),
    ]
    assert lin.session("1_1_0#1/2").source_id == "1_1_0#1"
    msg = lin.session("1_1_0#1/1").messages[1]
    # only the first ": " separates the speaker; the protagonist is the user
    assert (msg.speaker, msg.role, msg.text) == ("Lin Qiao", "user", "Agreed, and lavender along the railing: it handles the wind.")
    assert lin.session("1_0_0#0").messages[0].role == "assistant"

    qs = {q.question_id: q for q in lin.questions}
    assert len(qs) == 7 and collections.Counter(q.category for q in lin.questions) == {
        "profile": 2, "social_relationship": 1, "events": 1, "dialogues": 3}
    age = qs["Lin Qiao/profile/Age/0"]
    assert (age.answer, age.evidence, age.evidence_sessions) == ("Lin Qiao is 34 years old.", ("Age",), ())
    assert qs["Lin Qiao/social_relationship/1_0/0"].evidence_sessions == ()
    # event 1_1_0 -> its dialogue 1_1_0#1 -> both of that dialogue's sessions
    assert qs["Lin Qiao/events/1_1_0/0"].evidence_sessions == ("1_1_0#1/1", "1_1_0#1/2")
    plants = qs["Lin Qiao/dialogues/1_1_0#1/0"]
    assert plants.answer == "Grace Park will order 120 plants." and plants.evidence == ("1_1_0#1",)
    assert qs["Lin Qiao/dialogues/1_0_0#0/2"].evidence_sessions == ("1_0_0#0",)
    assert not any(q.is_abstention or q.question_date for q in lin.questions)

    bg = lin.background
    assert bg.profile["Age"] == "34" and bg.profile["Employer"] == "Greenline Studio"
    assert [(r.relation_id, r.name, r.relationship) for r in bg.relations] == [
        ("1_0", "Lin Wei", "younger brother"), ("1_1", "Grace Park", "colleague")]
    assert [(e.event_id, e.date) for e in bg.events] == [
        ("1_0_0", datetime(2022, 6, 3)), ("1_1_0", datetime(2021, 3, 1)), ("1_1_1", None)]
    assert bg.events[2].date_text == "during the autumn product launch"
    assert omar.questions == () and len(omar.sessions) == 1 and omar.speakers == ("Omar Haddad",)


def perltqa_files(tmp_path, mutate_mem=None, mutate_qa=None):
    mem = json.loads((FIXTURES / "perltmem_sample.json").read_text())
    qa = json.loads((FIXTURES / "perltqa_sample.json").read_text())
    if mutate_mem:
        mutate_mem(mem)
    if mutate_qa:
        mutate_qa(qa)
    write_json(tmp_path / "perltqa_t.json", qa)
    return write_json(tmp_path / "perltmem_t.json", mem)


@pytest.mark.parametrize("mutate_mem,mutate_qa,message", [
    (lambda m: m["Lin Qiao"]["dialogues"]["1_0_0#0"]["contents"]["2022-06-03 18:30"].append("no speaker here"),
     None, "perltmem_t.json: Lin Qiao: dialogues.1_0_0#0: contents['2022-06-03 18:30'][3]: dialogue line 'no speaker here'"),
    (lambda m: m["Lin Qiao"]["dialogues"]["1_0_0#0"].pop("events"), None,
     "perltmem_t.json: Lin Qiao: dialogues.1_0_0#0: missing 'events'"),
    (lambda m: m["Lin Qiao"]["social_relationship"]["1_0"].pop("Relationship"), None,
     "social_relationship.1_0: missing 'Relationship'"),
    (None, lambda q: q[0]["Lin Qiao"]["dialogues"][0]["1_1_0#1"][0].pop("Answer"),
     "perltqa_t.json: Lin Qiao: dialogues[0]: missing 'Answer'"),
    (None, lambda q: q[0]["Lin Qiao"]["events"][0]["1_1_0"][0].update({"Reference Memory": "['1_1_0'"}),
     "'Reference Memory' \"['1_1_0'\" is not a list literal"),
    (None, lambda q: q[0]["Lin Qiao"].update(hobbies=[]), "perltqa_t.json: Lin Qiao: unknown section 'hobbies'"),
    (None, lambda q: q[0].update({"Nobody": {}}), "questions for characters absent from perltmem_t.json: ['Nobody']"),
])
def test_perltqa_malformed(tmp_path, mutate_mem, mutate_qa, message):
    path = perltqa_files(tmp_path, mutate_mem, mutate_qa)
    with pytest.raises(DatasetFormatError) as info:
        load_perltqa(path)
    assert message in str(info.value)


def test_date_parsers():
    assert parse_locomo_datetime("12:05 am on 9 May, 2023") == datetime(2023, 5, 9, 0, 5)
    assert parse_locomo_datetime("12:30 pm on 1 January, 2022") == datetime(2022, 1, 1, 12, 30)
    assert parse_locomo_datetime("1:56 pm on 31 February, 2023") is None
    assert parse_longmemeval_datetime("2023/05/30 (Tue) 23:40") == datetime(2023, 5, 30, 23, 40)
    assert parse_loose_date("8 May, 2023") == datetime(2023, 5, 8)
    assert parse_loose_date("May 12, 2022") == datetime(2022, 5, 12)
    assert parse_loose_date("2012") == datetime(2012, 1, 1)
    assert parse_loose_date("during an election") is None


def test_values_are_frozen(tmp_path):
    (conv,) = load_locomo(write_json(tmp_path / "locomo10.json", [locomo_sample()]))
    with pytest.raises(AttributeError):
        conv.questions[0].answer = "changed"
    assert copy.deepcopy(conv) == conv
