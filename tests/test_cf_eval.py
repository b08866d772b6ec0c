"""CF/MCF benchmark scoring: suites, prompts, LightEval in a child process, the in-process scorer.

The spec for a score: for every sample, the prediction is the choice whose continuation tokens have the highest
summed log-probability given the prompt, divided by the choice's length in characters. The reference below
computes that directly with transformers, one sequence at a time, and LightEval's per-sample predictions (and
raysmol's in-process scorer) must equal it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import pytest
import torch
import yaml

from raysmol.eval.cf import (
    SuiteError,
    TaskSpec,
    evaluate_suite,
    load_docs,
    load_suite,
    predict,
    resolve_checkpoint,
    score_choices,
)

REPO = Path(__file__).resolve().parents[1]
TINY_SUITE = REPO / "eval" / "suites" / "tiny.yaml"
ABLATION_SUITE = REPO / "eval" / "suites" / "smollm3_ablation.yaml"

# Hand-made tasks: a cloze task (CF) and a question task scored with letters (MCF).
CLOZE_ROWS = [
    {"context": "The cat sat on the", "choices": ["mat", "moon", "piano"], "answer": 0},
    {"context": "Two plus three is", "choices": ["five", "purple"], "answer": 0},
    {"context": "Fish swim in the", "choices": ["sky", "water", "oven", "attic"], "answer": 1},
    {"context": "A week has seven", "choices": ["weeks", "days"], "answer": 1},
    {"context": "The model loss went", "choices": ["down", "sideways", "banana"], "answer": 0},
    {"context": "def f(x): return x", "choices": ["+ 1", "data token", "step"], "answer": 0},
]
MCF_ROWS = [
    {"question": "What is 2 + 2?", "choices": ["3", "4", "22", "5"], "answer": 1},
    {"question": "Which one is a colour?", "choices": ["red", "seven"], "answer": 0},
    {"question": "What does a tokenizer make?", "choices": ["tokens", "soup", "rain"], "answer": 0},
    {"question": "What is 10 - 3?", "choices": ["13", "6", "7", "30"], "answer": 2},
    {"question": "Where does the sun rise?", "choices": ["west", "east"], "answer": 1},
]


def expected_prompt(task: str, row: dict) -> tuple[str, list[str]]:
    """The prompt and continuations the suite promises, written out independently of raysmol."""
    if task == "handmade_cf":
        return row["context"], [" " + c for c in row["choices"]]
    letters = "ABCD"[: len(row["choices"])]
    listed = "".join(f"{letter}. {c}\n" for letter, c in zip(letters, row["choices"]))
    return f"Question: {row['question']}\n{listed}Answer:", [" " + letter for letter in letters]


def reference(model, tokenizer, query: str, choices: list[str]) -> tuple[int, list[float]]:
    """Char-normalised log-likelihood argmax, one unpadded forward pass per choice."""
    logprobs = []
    context = tokenizer(query).input_ids
    for choice in choices:
        continuation = tokenizer(choice, add_special_tokens=False).input_ids
        ids = torch.tensor([context + continuation])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        positions = torch.arange(len(context) - 1, len(context) + len(continuation) - 1)
        logprobs.append(logp[positions, torch.tensor(continuation)].sum().item())
    normed = [lp / len(c) for lp, c in zip(logprobs, choices)]
    return normed.index(max(normed)), logprobs


def llama(seed: int, vocab_size: int, eos_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=eos_id, pad_token_id=eos_id)
    return LlamaForCausalLM(config).eval()


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared CPU: one thread here and in the LightEval children (which inherit the env)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, small_data):
    """A tiny random Llama + a locally trained BPE saved as a Hugging Face folder, and a hand-made suite."""
    from transformers import AutoTokenizer

    from raysmol.data.tokenizer import resolve_tokenizer

    root = tmp_path_factory.mktemp("cf_eval")
    info = resolve_tokenizer(str(small_data["tokenizer"]), root / "tokcache")
    tokenizer = AutoTokenizer.from_pretrained(str(info.hf_dir))
    model = llama(0, len(tokenizer), tokenizer.eos_token_id)
    ckpt = root / "ckpt"
    model.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    write_jsonl(root / "data" / "cloze" / "validation.jsonl", CLOZE_ROWS)
    write_jsonl(root / "data" / "questions" / "test.jsonl", MCF_ROWS)
    suite = root / "handmade.yaml"
    suite.write_text(yaml.safe_dump({"name": "handmade", "tasks": [
        {"name": "handmade_cf", "schema": "cloze", "path": "data/cloze"},
        # Its own max_samples: LightEval's is pipeline-wide, so this takes a second pipeline in the child.
        {"name": "handmade_mcf", "schema": "qa", "path": "data/questions", "split": "test", "formulation": "mcf",
         "max_samples": 4},
    ]}))
    return {"root": root, "ckpt": ckpt, "tokenizer": tokenizer, "model": model, "suite": suite}


@pytest.fixture(scope="module")
def evaluated(setup):
    """One LightEval run of the hand-made suite on checkpoint A, reused by the assertions below."""
    assert torch.is_grad_enabled()
    results = evaluate_suite(setup["ckpt"], setup["suite"], setup["root"] / "out")
    return results, torch.is_grad_enabled()


ROWS = {"handmade_cf": CLOZE_ROWS, "handmade_mcf": MCF_ROWS}


def check_against_reference(results, model, tokenizer, suite: Path) -> None:
    for task in load_suite(suite).tasks:
        r, rows = results[task.name], ROWS[task.name]
        assert r["samples"] == min(len(rows), task.max_samples or len(rows))
        # LightEval's seeded subset, in its order, is what load_docs selects for the in-process scorer.
        assert [d["id"] for d in r["details"]] == [doc.id for doc in load_docs(task)]
        for d in r["details"]:
            row = rows[int(d["id"])]
            query, choices = expected_prompt(task.name, row)
            assert (d["query"], d["choices"], d["gold"]) == (query, choices, row["answer"])
            ref_pred, ref_logprobs = reference(model, tokenizer, query, choices)
            assert d["logprobs"] == pytest.approx(ref_logprobs, abs=1e-4)
            assert d["prediction"] == ref_pred
            assert d["correct"] == int(ref_pred == row["answer"])
        correct = [d["correct"] for d in r["details"]]
        assert r["score"] == pytest.approx(sum(correct) / len(correct))


def test_lighteval_predictions_equal_direct_char_normalised_argmax(setup, evaluated):
    results, _ = evaluated
    check_against_reference(results, setup["model"], setup["tokenizer"], setup["suite"])
    # A random model guesses: the test is only meaningful if predictions are not all the same index.
    assert len({d["prediction"] for r in results.values() for d in r["details"]}) > 1


def test_results_carry_identity_and_are_written(setup, evaluated):
    results, _ = evaluated
    r = results["handmade_mcf"]
    assert r["formulation"] == "mcf" and results["handmade_cf"]["formulation"] == "cf"
    assert r["suite"] == "handmade" and r["metric"] == "acc_norm"
    assert r["model"]["path"] == str(setup["ckpt"].resolve())
    assert len(r["model"]["sha256"]) == 64 and r["model"]["name"].endswith(r["model"]["sha256"][:12])
    correct = [d["correct"] for d in r["details"]]
    assert r["stderr"] == pytest.approx(statistics.stdev(correct) / math.sqrt(len(correct)))
    for task, res in results.items():
        written = json.loads((setup["root"] / "out" / r["model"]["name"] / "handmade" / f"{task}.json").read_text())
        assert written["score"] == res["score"] and written["details"] == res["details"]


def test_caller_keeps_autograd(evaluated):
    _, grad_enabled_after = evaluated
    assert grad_enabled_after
    assert torch.is_grad_enabled()


def test_new_weights_at_the_same_path_give_fresh_scores(setup, evaluated):
    """LightEval's cache keys on the model name: overwriting the weights must still change the results."""
    results_a, _ = evaluated
    model_b = llama(1, len(setup["tokenizer"]), setup["tokenizer"].eos_token_id)
    model_b.save_pretrained(setup["ckpt"])
    try:
        results_b = evaluate_suite(setup["ckpt"], setup["suite"], setup["root"] / "out")
    finally:
        setup["model"].save_pretrained(setup["ckpt"])  # checkpoint A again for the other tests
    assert results_b["handmade_cf"]["model"]["sha256"] != results_a["handmade_cf"]["model"]["sha256"]
    by_id = {d["id"]: d["logprobs"] for d in results_a["handmade_cf"]["details"]}
    assert all(d["logprobs"] != by_id[d["id"]] for d in results_b["handmade_cf"]["details"])
    check_against_reference(results_b, model_b, setup["tokenizer"], setup["suite"])


@pytest.mark.slow
def test_in_process_scorer_agrees_with_lighteval_on_the_tiny_suite(setup, tmp_path, capsys):
    """`raysmol eval` on the shipped tiny suite, then score_choices on the same samples in this process."""
    from raysmol.eval.cli import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["eval", str(setup["ckpt"]), "--suite", str(TINY_SUITE), "--out", str(tmp_path),
                              "--max-samples", "16"])
    assert args.fn(args) == 0
    table = capsys.readouterr().out
    model, tokenizer = setup["model"], setup["tokenizer"]
    model.train()  # as inside the training loop: the scorer must switch to eval and back
    suite = load_suite(TINY_SUITE)
    assert {t.formulation for t in suite.tasks} == {"cf", "mcf"}
    for task in suite.tasks:
        files = list(tmp_path.glob(f"*/tiny/{task.name}.json"))
        assert len(files) == 1
        lighteval = json.loads(files[0].read_text())
        docs = load_docs(task, 16)
        assert [d.id for d in docs] == [d["id"] for d in lighteval["details"]]  # the same samples, same order
        assert predict(model, tokenizer, docs, batch_size=5) == [d["prediction"] for d in lighteval["details"]]
        assert score_choices(model, tokenizer, docs, batch_size=7) == pytest.approx(lighteval["score"])
        assert task.name in table and f"{lighteval['score']:.4f}" in table
    assert model.training and torch.is_grad_enabled()


# ----------------------------------------------------------------------------------- suites (no LightEval)


def test_ablation_suite_lists_the_playbook_benchmarks():
    suite = load_suite(ABLATION_SUITE)
    tasks = {t.name: t for t in suite.tasks}
    assert set(tasks) == {"mmlu", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "commonsense_qa",
                          "openbookqa", "piqa"}  # 7 benchmarks, ARC in two parts
    assert {t.hf_repo for t in suite.tasks} == {"cais/mmlu", "allenai/ai2_arc", "Rowan/hellaswag",
                                                 "allenai/winogrande", "tau/commonsense_qa", "allenai/openbookqa",
                                                 "ybisk/piqa"}
    assert {(t.hf_subset, t.split) for t in suite.tasks if t.hf_repo == "allenai/ai2_arc"} == {
        ("ARC-Easy", "test"), ("ARC-Challenge", "test")}
    assert all(t.max_samples == 1000 and t.formulation == "cf" and t.path is None for t in suite.tasks)


def test_path_replaces_the_hub_dataset(tmp_path):
    write_jsonl(tmp_path / "mmlu" / "test.jsonl", [{"question": "q", "subject": "s", "choices": ["a", "b"],
                                                     "answer": 1}])
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"name": "s", "tasks": [
        {"name": "mmlu", "schema": "mmlu", "hf_repo": "cais/mmlu", "hf_subset": "all", "split": "test",
         "path": "mmlu"}]}))
    task = load_suite(tmp_path / "s.yaml").tasks[0]
    assert task.dataset() == (str(tmp_path / "mmlu"), "default")
    [doc] = load_docs(task)
    assert (doc.query, doc.choices, doc.gold_index) == ("Question: q\nAnswer:", [" a", " b"], 1)


# One row of each hub dataset in its published schema -> (CF prompt, CF choices, gold).
HUB_ROWS = {
    "mmlu": ({"question": "2+2?", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1},
             "Question: 2+2?\nAnswer:", [" 3", " 4", " 5", " 6"], 1),
    "arc": ({"id": "x", "question": "Hot?", "choices": {"text": ["sun", "ice"], "label": ["A", "B"]},
             "answerKey": "A"}, "Question: Hot?\nAnswer:", [" sun", " ice"], 0),
    "commonsense_qa": ({"id": "x", "question": "Sit on?", "question_concept": "c",
                        "choices": {"label": ["A", "B", "C"], "text": ["chair", "cloud", "idea"]}, "answerKey": "A"},
                       "Question: Sit on?\nAnswer:", [" chair", " cloud", " idea"], 0),
    "openbookqa": ({"id": "x", "question_stem": "Plants need", "choices": {"text": ["light", "tv"],
                    "label": ["1", "2"]}, "answerKey": "1"}, "Question: Plants need\nAnswer:", [" light", " tv"], 0),
    "hellaswag": ({"ind": 1, "activity_label": "Cooking", "ctx_a": "A man cracks eggs.", "ctx_b": "he",
                   "ctx": "", "endings": ["whisks them [title] fast.", "eats the pan."], "label": "0",
                   "split": "val", "split_type": "indomain", "source_id": "x"},
                  "Cooking: A man cracks eggs. He", [" whisks them. fast.", " eats the pan."], 0),
    "winogrande": ({"sentence": "The cup fell off the table because _ was wobbly.", "option1": "the cup",
                    "option2": "the table", "answer": "2"}, "The cup fell off the table because",
                   [" the cup was wobbly.", " the table was wobbly."], 1),
    "piqa": ({"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0},
             "Question: Open a jar\nAnswer:", [" twist the lid", " eat the lid"], 0),
}


@pytest.mark.parametrize("schema", sorted(HUB_ROWS))
def test_hub_schemas_map_rows_to_prompts(schema):
    row, query, choices, gold = HUB_ROWS[schema]
    item = TaskSpec(name="t", schema=schema, formulation="cf").to_item(row, 3)
    assert (item.query, item.choices, item.gold_index, item.id) == (query, choices, gold, "3")
    mcf = TaskSpec(name="t", schema=schema, formulation="mcf").to_item(row, 3)
    assert mcf.choices == [" A", " B", " C", " D"][: len(choices)] and mcf.gold_index == gold
    lines = mcf.query.split("\n")
    assert lines[0].startswith("Question: ") and lines[-1] == "Answer:"
    assert [line[:3] for line in lines[-1 - len(choices):-1]] == ["A. ", "B. ", "C. ", "D. "][: len(choices)]


def test_a_row_of_another_dataset_names_the_missing_field():
    with pytest.raises(SuiteError, match=r"task 't': row 7 of x/y does not fit schema 'arc' \(KeyError: 'choices'\); "
                                         r"its fields: \['answer', 'question'\]\..*answerKey"):
        TaskSpec(name="t", schema="arc", hf_repo="x/y").to_item({"question": "q", "answer": 1}, 7)


def test_unlabeled_rows_are_skipped():
    row = dict(HUB_ROWS["hellaswag"][0], label="")
    assert TaskSpec(name="t", schema="hellaswag", formulation="cf").to_item(row, 0) is None


@pytest.mark.parametrize("raw, message", [
    ({"tasks": [{"name": "a", "schema": "qa", "hf_repo": "x/y"}]}, "name: missing"),
    ({"name": "s"}, "tasks: missing or empty"),
    ({"name": "s", "tasks": [{"schema": "qa", "hf_repo": "x/y"}]}, "tasks.0.name: missing"),
    ({"name": "s", "tasks": [{"name": "a", "hf_repo": "x/y"}]}, "tasks.0.schema: missing; valid: arc, cloze"),
    ({"name": "s", "tasks": [{"name": "a", "schema": "mmlu_pro", "hf_repo": "x/y"}]},
     "tasks.0.schema: unknown schema 'mmlu_pro'; valid: arc, cloze"),
    ({"name": "s", "tasks": [{"name": "a", "schema": "qa"}]}, "tasks.0.hf_repo: missing"),
    ({"name": "s", "tasks": [{"name": "a", "schema": "qa", "hf_repo": "x/y", "formulation": "mc"}]},
     "tasks.0.formulation: 'mc' is not one of 'cf', 'mcf'"),
    ({"name": "s", "tasks": [{"name": "a", "schema": "qa", "hf_repo": "x/y", "shots": 5}]},
     "unknown key 'tasks.0.shots'"),
    ({"name": "s", "tasks": [{"name": "a|5", "schema": "qa", "hf_repo": "x/y"}]}, "tasks.0.name: 'a|5' may only"),
    ({"name": "s", "tasks": [{"name": "a", "schema": "qa", "hf_repo": "x/y"}] * 2},
     "tasks.1.name: 'a' is listed twice"),
    ({"name": "s", "tasks": [{"name": "a", "schema": "qa", "path": "nowhere"}]}, "tasks.0.path: dataset folder"),
])
def test_suite_errors_name_file_and_key(tmp_path, raw, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SuiteError) as e:
        load_suite(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_local_dataset_without_the_split(tmp_path):
    write_jsonl(tmp_path / "d" / "train.jsonl", CLOZE_ROWS)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"name": "s", "tasks": [
        {"name": "a", "schema": "cloze", "path": "d"}]}))
    with pytest.raises(SuiteError, match="has no file for split 'validation'"):
        load_suite(tmp_path / "s.yaml")


def test_rows_that_do_not_fit_the_schema(tmp_path):
    write_jsonl(tmp_path / "d" / "validation.jsonl", MCF_ROWS)  # question rows, cloze schema
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"name": "s", "tasks": [
        {"name": "a", "schema": "cloze", "path": "d"}]}))
    with pytest.raises(SuiteError, match=r"task 'a': row 0 of .* does not fit schema 'cloze' \(KeyError: 'context'\); "
                                         r"its fields: \['answer', 'choices', 'question'\]"):
        load_docs(load_suite(tmp_path / "s.yaml").tasks[0])


def test_checkpoint_must_be_a_hugging_face_folder(setup, tmp_path):
    with pytest.raises(SuiteError, match="does not exist"):
        resolve_checkpoint(tmp_path / "missing")
    (tmp_path / "ds").mkdir()
    (tmp_path / "state.json").write_text("{}")
    with pytest.raises(SuiteError, match=r"not a Hugging Face model folder \(a DeepSpeed training checkpoint.*\): "
                                         r"it has no config.json; no model.safetensors or .*; no tokenizer.json or"):
        resolve_checkpoint(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "hf").symlink_to(setup["ckpt"])
    assert resolve_checkpoint(run_dir) == setup["ckpt"].resolve()
    with pytest.raises(SuiteError, match="suite file .* does not exist"):
        evaluate_suite(setup["ckpt"], tmp_path / "none.yaml", tmp_path / "out")


@pytest.mark.slow
def test_child_reports_a_bad_row_in_our_words(setup, tmp_path):
    write_jsonl(tmp_path / "d" / "validation.jsonl", MCF_ROWS)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"name": "s", "tasks": [
        {"name": "a", "schema": "cloze", "path": "d"}]}))
    with pytest.raises(SuiteError, match="does not fit schema 'cloze'"):
        evaluate_suite(setup["ckpt"], tmp_path / "s.yaml", tmp_path / "out")


@pytest.mark.slow
def test_ablation_suite_runs_on_local_copies(setup, tmp_path):
    """The real suite file with `path:` pointing every task at a local folder in its hub dataset's schema."""
    raw = yaml.safe_load(ABLATION_SUITE.read_text())
    for task in raw["tasks"]:
        row = HUB_ROWS[task["schema"]][0]
        write_jsonl(tmp_path / task["name"] / f"{task['split']}.jsonl", [row] * 3)
        task["path"] = task["name"]
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(raw))
    results = evaluate_suite(setup["ckpt"], tmp_path / "local.yaml", tmp_path / "out")
    assert set(results) == {t["name"] for t in raw["tasks"]}
    for task in load_suite(tmp_path / "local.yaml").tasks:
        r = results[task.name]
        assert r["samples"] == 3 and r["dataset"] == {"path": str(tmp_path / task.name), "split": task.split}
        item = task.to_item(HUB_ROWS[task.schema][0], 0)
        for d in r["details"]:
            ref_pred, _ = reference(setup["model"], setup["tokenizer"], item.query, item.choices)
            assert (d["query"], d["choices"], d["prediction"]) == (item.query, item.choices, ref_pred)
