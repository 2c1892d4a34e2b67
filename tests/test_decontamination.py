"""Decontamination: evaluation items planted in training data are found however they were disguised,
near misses are kept, and the result is in the entry (removed.jsonl) and its key."""
from __future__ import annotations

import json

import pytest

from conftest import ROOT, TINY_MODEL, cli, write_recipe
from posttrain.data.decontam import EvalItem, Index, words
from posttrain.data.sources import DataConfig
from support.in_memory import load_conversations, load_preferences
from posttrain.core.errors import UserError

LONG_QUESTION = ("A train leaves the station at nine in the morning travelling at sixty miles per hour towards "
                 "a city three hundred miles away; when does it arrive?")
SHORT_QUESTION = "What is 19 plus 8?"  # five words: under n, caught whole


def reference(tmp_path):
    path = tmp_path / "eval_items.jsonl"
    path.write_text(json.dumps({"question": LONG_QUESTION, "answer": "At two in the afternoon."}) + "\n"
                    + json.dumps({"question": SHORT_QUESTION, "answer": "27"}) + "\n")
    return path


def chat(user: str, answer: str = "Sure.") -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


PLANTED = {
    "verbatim": chat(LONG_QUESTION),
    "case, punctuation and whitespace": chat(LONG_QUESTION.upper().replace(";", " ...").replace(" ", "   \t")),
    "embedded in a longer answer": chat("Tell me a story.", "Once upon a time someone asked: " + LONG_QUESTION
                                        + " Nobody knew."),
    "a short item whole": chat(f"Quick: {SHORT_QUESTION} Answer fast."),
    "short item, other spacing and case": chat("what IS 19   plus 8"),
    "zero-width characters inside words": chat("A tr\u200bain leaves the sta\u00adtion at ni\u200dne in the "
                                               + LONG_QUESTION.split(" ", 7)[-1]),
    "curly quotes, no-break spaces and full-width digits": chat("What\u00a0is \uff11\uff19 plus 8\u201d?"),
}
NEAR_MISSES = {
    # 12 consecutive words of the long question (n = 13), then something else
    "twelve words in a row": chat(" ".join(LONG_QUESTION.split()[:12]) + " and then it stopped."),
    "a short item with a word changed": chat("What is 19 plus 9?"),
    "a short item cut": chat("What is 19 plus?"),
    # a gold answer alone never removes a row, however long
    "the gold answer of a long item": chat("When?", "The answer is at two in the afternoon, clearly."),
}


def write_rows(tmp_path, rows: dict) -> object:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows.values()))
    return path


def test_planted_items_are_removed_and_near_misses_kept(tmp_path):
    rows = {**PLANTED, **NEAR_MISSES}
    data = write_rows(tmp_path, rows)
    config = DataConfig(sources=[{"path": str(data)}], decontaminate={"files": [str(reference(tmp_path))]})
    kept, stats = load_conversations(config, tmp_path, 0)
    kept_text = {json.dumps({"messages": r["messages"]}) for r in kept}
    for name, row in PLANTED.items():
        assert json.dumps(row) not in kept_text, f"planted row survived: {name}"
    for name, row in NEAR_MISSES.items():
        assert json.dumps(row) in kept_text, f"near miss removed: {name}"
    assert stats["decontamination"]["contaminated"] == len(PLANTED) == stats["decontaminated_rows"]
    lines = {hit["row"]: hit for hit in stats["_contaminated"]}
    assert set(lines) == set(range(1, len(PLANTED) + 1))  # reported by file row
    assert lines[1]["task"] == "eval_items.jsonl" and all(hit["rule"] == "question" for hit in lines.values())


def test_flag_keeps_the_rows_and_fail_above_stops_the_run(tmp_path):
    data = write_rows(tmp_path, {**PLANTED, **NEAR_MISSES})
    ref = str(reference(tmp_path))
    kept, stats = load_conversations(DataConfig(sources=[{"path": str(data)}],
                                                decontaminate={"files": [ref], "policy": "flag"}), tmp_path, 0)
    assert len(kept) == len(PLANTED) + len(NEAR_MISSES) and stats["decontamination"]["contaminated"] == len(PLANTED)
    with pytest.raises(UserError, match=r"7 of 11 training rows \(63.6%\) contain evaluation items, above fail_above"):
        load_conversations(DataConfig(sources=[{"path": str(data)}],
                                      decontaminate={"files": [ref], "fail_above": 0.5}), tmp_path, 0)


def test_preference_pairs_are_checked_on_prompt_and_both_answers(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "Tell me something.", "chosen": "Fine.", "rejected": LONG_QUESTION}) + "\n"
                    + json.dumps({"prompt": "Hello", "chosen": "Hi!", "rejected": "Go away."}) + "\n")
    kept, stats = load_preferences(DataConfig(sources=[{"path": str(path)}],
                                              decontaminate={"files": [str(reference(tmp_path))]}), tmp_path, 0)
    assert len(kept) == 1 and stats["decontaminated_rows"] == 1


def test_hash_collisions_never_remove_a_row(monkeypatch):
    import numpy as np

    import posttrain.data.decontam as decontam

    # Every word hashes alike, so every window of every text collides with the item's windows.
    monkeypatch.setattr(decontam, "_word_hashes", lambda tokens: np.ones(len(tokens), dtype=np.uint64))
    index = Index.build([EvalItem("t", "1", tuple(words(LONG_QUESTION)))], n=13)
    other = "completely different words that share nothing at all with the question in the index here"
    assert index.find(other) is None  # the words are compared before a row is reported
    assert index.find("so: " + LONG_QUESTION) is not None


@pytest.mark.slow
def test_sft_stage_writes_removed_jsonl_and_its_key_covers_the_references(tmp_path):
    ref = reference(tmp_path)
    data = write_rows(tmp_path, {**PLANTED, **NEAR_MISSES, "more": chat("Hello there", "Hi")})
    recipe = write_recipe(tmp_path, f"""
        name: decon
        base: {{model: {TINY_MODEL}, chat_template: llama-3.1}}
        stages:
          sft:
            kind: sft
            data:
              sources: [{{path: {data}}}]
              decontaminate: {{files: [{ref}]}}
            training: {{max_steps: 1, report_to: []}}
        """)
    run = cli("run", str(recipe))
    assert run.returncode == 0, run.stderr[-1500:]
    import posttrain

    result = posttrain.run(recipe)
    # The data entry holds the removed rows and the counts; the training stage repeats the total.
    removed = [json.loads(line) for line in (result.path("sft.data") / "removed.jsonl").read_text().splitlines()]
    assert len(removed) == len(PLANTED) and all(r["action"] == "drop" for r in removed)
    assert result.metrics("sft.data")["decontamination"]["contaminated"] == len(PLANTED)
    assert result.metrics("sft")["decontaminated_rows"] == len(PLANTED)
    report = cli("report", str(recipe), "--out", str(tmp_path / "report"))
    assert report.returncode == 0 and (f"{len(PLANTED)} of {len(PLANTED) + len(NEAR_MISSES) + 1} rows contained evaluation "
                                       f"items (drop; eval_items.jsonl: {len(PLANTED)} [question {len(PLANTED)}])") in \
        (tmp_path / "report" / "report.md").read_text()
    ref.write_text(ref.read_text() + json.dumps({"question": "Hello there my good friend"}) + "\n")
    plan = cli("plan", str(recipe))
    assert "sft" in plan.stdout and "contents of data.decontaminate.files.0 changed" in plan.stdout


@pytest.mark.slow
def test_local_lm_eval_tasks_are_references(tmp_path):
    config = DataConfig(sources=[{"path": str(ROOT / "data" / "sft" / "tiny_chat_train.jsonl")}],
                        decontaminate={"tasks": ["tiny_arith_gen"], "task_dirs": [str(ROOT / "data" / "eval" / "tasks")]})
    kept, stats = load_conversations(config, tmp_path, 0)
    # The tiny chat data asks some of the very additions the tiny eval task asks.
    assert stats["decontamination"]["by_task"] == {"tiny_arith_gen": stats["decontaminated_rows"]}
    assert stats["decontaminated_rows"] > 0 and len(kept) == 256 - stats["decontaminated_rows"]


def test_worker_processes_find_the_same_rows_in_the_same_order():
    from posttrain.data.decontam import scan

    index = Index.build([EvalItem("t", "1", tuple(words(LONG_QUESTION))),
                         EvalItem("t", "2", tuple(words(SHORT_QUESTION)))], n=13)
    rows = [(i, {**(PLANTED if i % 7 == 0 else NEAR_MISSES)[name]})
            for i in range(300) for name in [list((PLANTED if i % 7 == 0 else NEAR_MISSES))[i % 3]]]
    one = [(label, match is not None) for label, _, match in scan(rows, index, workers=1)]
    two = [(label, match is not None) for label, _, match in scan(rows, index, workers=2, chunk=16)]
    assert one == two and sum(hit for _, hit in one) == len(range(0, 300, 7))


@pytest.mark.slow
def test_unreachable_benchmarks_are_one_clear_error(tmp_path):
    config = DataConfig(sources=[{"path": str(ROOT / "data" / "sft" / "tiny_chat_train.jsonl")}],
                        decontaminate={"tasks": ["mmlu"]})
    with pytest.raises(UserError, match="could not load the evaluation tasks mmlu"):
        load_conversations(config, tmp_path, 0)


def item(question: str, answer: str = "", options: tuple[str, ...] = ()) -> EvalItem:
    return EvalItem("quiz", question[:20], tuple(words(question)), tuple(words(answer)),
                    tuple(tuple(words(o)) for o in options))


def test_a_short_gold_answer_in_an_options_list_removes_nothing():
    # Both rows were removed before: the answers matched alone, whole.
    index = Index.build([
        item("In the story of the lighthouse on the northern cape, whose lamp was it that failed in the storm?",
             "the keeper's", ("the sailor's", "the keeper's", "the mayor's", "the child's")),
        item("Maria's train leaves Leeds at six and the trip takes two hours; when does she reach York?",
             "8 o'clock")])
    clean = ["Pick the possessive: (a) the dog's (b) the keeper's (c) the cats' (d) the boys'",
             "The other train, the express from Glasgow, pulls in at 8 o'clock sharp every evening."]
    assert [index.find(text) for text in clean] == [None, None]
    # The item's own question is still caught, and so is a short one together with its answer.
    assert index.find("Q: Maria's train leaves Leeds at six and the trip takes two hours; when does she reach "
                      "York? A: at 8 o'clock").rule == "question"


def test_a_generic_question_matches_only_with_its_options_or_a_telling_answer():
    generic = "Which of the following is correct?"
    index = Index.build([
        item(generic, "Ice floats on water", ("Ice sinks in water", "Ice floats on water", "Water is dry")),
        item(generic, "Paris", ("Paris is in Spain", "Rome is in France", "Paris is in France")),
        item("Which of the following statements is true?", "B", ("Cats bark", "Dogs bark")),
        item("Which of the following statements is true?", "A", ("Fish fly", "Birds fly"))])
    assert index.generic_questions == 4
    clean = [f"{generic} Think about it before answering.",
             f"Quiz time! {generic} (a) Paris (b) Berlin. The answer is Paris.",  # a short answer: not telling
             "Which of the following statements is true? Neither, as it happens."]
    assert [index.find(text) for text in clean] == [None, None, None]
    with_options = index.find(f"{generic}\nA. Ice sinks in water\nB. Ice floats on water\nC. Water is dry")
    assert with_options.rule == "question+options" and "ice floats on water" in with_options.ngram
    with_answer = index.find(f"User: {generic} Assistant: ice floats on water, of course.")
    assert with_answer.rule == "question+answer"
    # Options far from the question, or before it, are not the item.
    assert index.find("Cats bark. Dogs bark. " + "Which of the following statements is true?") is None


def test_ngrams_shared_by_several_items_do_not_match_alone():
    boilerplate = "Solve the problem below and give the final answer as a single integer after the words"
    index = Index.build([item(f"{boilerplate} Ann has {n} apples and eats two of them; how many are left?")
                         for n in (5, 7, 9)])
    assert index.find(f"Homework: {boilerplate} 'the answer is'.") is None
    hit = index.find(f"{boilerplate} Ann has 7 apples and eats two of them; how many are left?")
    assert hit is not None and hit.rule == "question"


def test_question_and_options_from_a_file_and_rules_in_removed_rows(tmp_path):
    generic = "Which of the following is correct?"
    ref = tmp_path / "mc.jsonl"
    ref.write_text(json.dumps({"question": generic, "answer": "Ice floats on water",
                               "choices": {"label": ["A", "B"], "text": ["Ice sinks in water", "Ice floats on water"]}})
                   + "\n" + json.dumps({"question": generic, "answer": "Seven", "choices": ["Six", "Seven"]}) + "\n")
    rows = {"clean": chat(generic + " Tell me which one."),
            "planted": chat(f"{generic} A) Ice sinks in water B) Ice floats on water", "B")}
    config = DataConfig(sources=[{"path": str(write_rows(tmp_path, rows))}], decontaminate={"files": [str(ref)]})
    kept, stats = load_conversations(config, tmp_path, 0)
    assert [r["messages"] for r in kept] == [rows["clean"]["messages"]]
    assert stats["decontamination"]["by_task_and_rule"] == {"mc.jsonl": {"question+options": 1}}
    assert stats["_contaminated"][0]["rule"] == "question+options"
