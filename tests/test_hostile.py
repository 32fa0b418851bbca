"""Hostile input, generated (hypothesis): the scorer, the task loader and the retrieval server's request model never
raise an unhandled exception, and their answers stay in range."""

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from envs import exact_match, f1_score, load_tasks, normalize_answer

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),  # what JSON can hold
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.text(), st.lists(st.text(), min_size=1, max_size=4))
def test_scores_stay_in_range(prediction, golds):
    em, f1 = exact_match(prediction, golds), f1_score(prediction, golds)
    assert em in (0.0, 1.0) and 0.0 <= f1 <= 1.0
    if em == 1.0 and normalize_answer(prediction):
        assert f1 == pytest.approx(1.0)  # the same normalised tokens
    assert exact_match(prediction, [prediction]) == float(bool(normalize_answer(prediction)))  # an empty gold matches nothing


# A row of a task file: mostly near-valid records (the fields a loader looks at, with wrong types), sometimes any JSON.
fields = st.sampled_from(["question", "golden_answers", "reward_model", "data_source", "ground_truth", "target"])
near_records = st.dictionaries(fields, json_values | st.dictionaries(fields, json_values, max_size=3), max_size=4)


@settings(max_examples=300, deadline=None)
@given(st.lists(near_records | json_values, max_size=4), st.booleans())
def test_load_tasks_accepts_or_says_which_row(rows, garbage_line):
    lines = [json.dumps(r) for r in rows] + (["{not json"] if garbage_line else [])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tasks.jsonl"
        path.write_text("\n".join(lines))
        try:
            tasks = load_tasks(path)
        except ValueError as err:
            assert str(path) in str(err)
            return
    for task in tasks:
        assert isinstance(task.question, str) and task.answers and all(isinstance(a, str) for a in task.answers)


@pytest.fixture(scope="module")
def client(default_retriever):
    from fastapi.testclient import TestClient

    from retrieval_server import make_app

    return TestClient(make_app(default_retriever, max_topk=50, max_queries=8, max_query_chars=200))


request_bodies = st.fixed_dictionaries(
    {"queries": st.lists(st.text(max_size=250), max_size=10) | json_values},
    optional={"topk": st.integers(-5, 60) | json_values, "return_scores": json_values},
) | json_values


@settings(max_examples=200, deadline=None)
@given(request_bodies)
def test_server_answers_every_body_with_a_result_or_a_422(client, body):
    response = client.post("/retrieve", json=body)
    assert response.status_code in (200, 422), (response.status_code, response.text[:300])
    if response.status_code == 200:
        results = response.json()["result"]
        assert len(results) == len(body["queries"]) and all(len(hits) <= 50 for hits in results)
    else:
        assert response.json()["detail"]  # a message, not a traceback
