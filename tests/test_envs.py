import json
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from atpo_tree import BatchSampler, StepRequest, grow_trees
from envs import (
    DEFAULT_TASK_DIR,
    INVALID_ACTION,
    TAGS,
    Action,
    BM25Retriever,
    HttpRetriever,
    Passage,
    RetrievalError,
    SearchEnv,
    Task,
    build_prompt,
    exact_match,
    f1_score,
    format_passages,
    load_tasks,
    read_corpus,
    normalize_answer,
    parse_action,
)

ROOT = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------------------------------------------
# The parser

no_tag_text = st.text(alphabet=st.characters(blacklist_characters="<"))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.lists(st.sampled_from(list(TAGS) + ["<think>", "x", " ", "é", "\n", "<", ">", "/"])).map("".join)))
def test_parser_never_raises(text):
    action = parse_action(text)
    assert action.kind in ("search", "answer", "invalid")


@settings(max_examples=300, deadline=None)
@given(no_tag_text, st.sampled_from(["search", "answer"]), no_tag_text.filter(lambda s: s.strip()), st.text())
def test_parser_recovers_well_formed_actions(prefix, kind, content, suffix):
    text = f"{prefix}<{kind}>{content}</{kind}>{suffix}"
    assert parse_action(text) == Action(kind, content.strip())


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>a</think>\n<search> who is x </search>", Action("search", "who is x")),
        ("<answer>Paris</answer>", Action("answer", "Paris")),
        ("<search> q1 </search> <search> q2 </search>", Action("search", "q1")),  # the first closing tag decides
        ("<answer> A </answer><search> q </search>", Action("answer", "A")),
        ("<search> a <search> b </search>", Action("search", "b")),  # the innermost opening tag
        ("<search><answer> x </answer></search>", Action("answer", "x")),  # a stop-string engine stops at </answer>
        ("<search> Zürich 東京 </search>", Action("search", "Zürich 東京")),
        ("<search> unfinished query", Action("invalid", "no </search> or </answer>")),
        ("just text", Action("invalid", "no </search> or </answer>")),
        ("query </search>", Action("invalid", "</search> without <search>")),
        ("<search>   </search>", Action("invalid", "empty <search>")),
        ("<answer></answer>", Action("invalid", "empty <answer>")),
        ("<search> a <information> b </search>", Action("invalid", "a tag inside <search>")),
        ("<answer> x </search>", Action("invalid", "</search> without <search>")),
        ("", Action("invalid", "no </search> or </answer>")),
    ],
)
def test_parser_hand_cases(text, expected):
    assert parse_action(text) == expected


def test_parser_long_turn():
    text = "<think>" + "blah " * 2000 + "</think><search> " + "q" * 5000 + " </search>" + "x" * 3000
    assert parse_action(text) == Action("search", "q" * 5000)
    assert parse_action("<search>" * 2000).kind == "invalid"


# ----------------------------------------------------------------------------------------------------------------
# Answers


def test_normalisation_and_em():
    assert normalize_answer("  The  Eiffel-Tower! ") == "eiffeltower"
    assert normalize_answer("An apple, a pear and THE plum.") == "apple pear and plum"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert exact_match("the Paris", ["London", "paris"]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    assert exact_match("1952.", ["1952"]) == 1.0
    assert exact_match("", ["x"]) == 0.0
    assert exact_match(".", [""]) == 0.0 and exact_match("the", ["The", "Paris"]) == 0.0  # an empty gold matches nothing
    assert exact_match("Paris", ["The", "Paris"]) == 1.0


def test_f1():
    assert f1_score("Paris France", ["Paris"]) == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert f1_score("new york city", ["New York", "NYC"]) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert f1_score("Berlin", ["Paris"]) == 0.0
    assert f1_score("", ["Paris"]) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# Data


def test_loaders_and_clear_errors(tmp_path):
    good = tmp_path / "q.jsonl"
    good.write_text(json.dumps({"question": " Who? ", "golden_answers": ["A", "B"], "data_source": "nq"}) + "\n")
    assert load_tasks(good) == [Task("Who?", ["A", "B"], "nq")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "Who?"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: line 1 has no field 'golden_answers'"):
        load_tasks(bad)
    bad.write_text(json.dumps({"golden_answers": ["x"]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: line 1 has no field 'question'"):
        load_tasks(bad)
    bad.write_text("\n{not json\n")  # a blank first line: numbers count every line, from 1
    with pytest.raises(ValueError, match="bad.jsonl: line 2 is not valid JSON"):
        load_tasks(bad)
    for answers in (["The"], ".", [" a  an "], []):  # nothing left after normalisation: any article would score
        bad.write_text(json.dumps({"question": "Who?", "golden_answers": ["x"]}) + "\n"
                       + json.dumps({"question": "Who?", "golden_answers": answers}) + "\n")
        with pytest.raises(ValueError, match="bad.jsonl: line 2: no gold answer left after normalisation"):
            load_tasks(bad)
    bad.write_text(json.dumps({"question": "Who?", "golden_answers": ["The", "Paris"]}) + "\n")
    assert load_tasks(bad)[0].answers == ["The", "Paris"]
    parquet = tmp_path / "not.parquet"
    parquet.write_text("not parquet")
    with pytest.raises(ValueError, match="not.parquet: not a readable parquet file"):
        load_tasks(parquet)
    with pytest.raises(FileNotFoundError):
        load_tasks(tmp_path / "missing.jsonl")


def test_search_r1_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # the columns of Search-R1's processed files: question, golden_answers, data_source, prompt, reward_model, ...
    table = pa.Table.from_pylist(
        [
            {"id": "train_0", "question": "who wrote x?", "golden_answers": ["Ann"], "data_source": "nq",
             "prompt": [{"role": "user", "content": "...Question: who wrote x?"}], "ability": "fact-reasoning",
             "reward_model": {"style": "rule", "ground_truth": {"target": ["Ann"]}}, "extra_info": {"split": "train", "index": 0}},
        ]
    )
    pq.write_table(table, tmp_path / "train.parquet")
    assert load_tasks(tmp_path / "train.parquet") == [Task("who wrote x?", ["Ann"], "nq")]
    pq.write_table(table.drop(["golden_answers"]), tmp_path / "rm.parquet")  # answers only under reward_model
    assert load_tasks(tmp_path / "rm.parquet") == [Task("who wrote x?", ["Ann"], "nq")]
    pq.write_table(table.drop(["golden_answers", "reward_model"]), tmp_path / "none.parquet")
    with pytest.raises(ValueError, match="none.parquet: row 1 has no field 'golden_answers'"):
        load_tasks(tmp_path / "none.parquet")


def test_default_task_files():
    corpus = [json.loads(line) for line in (DEFAULT_TASK_DIR / "corpus.jsonl").read_text().splitlines()]
    train, test = load_tasks(DEFAULT_TASK_DIR / "train.jsonl"), load_tasks(DEFAULT_TASK_DIR / "test.jsonl")
    assert len(corpus) >= 2000 and len(train) >= 1000 and len(test) >= 200
    assert {t.source for t in test} == {"default-1hop", "default-2hop"}
    assert not {t.question for t in train} & {t.question for t in test}


def test_default_task_rebuilds_byte_for_byte(tmp_path):
    from build_default_task import FILES

    subprocess.run([sys.executable, "build_default_task.py", "--no-closed-book", "--out", str(tmp_path)], cwd=ROOT, check=True, capture_output=True)
    assert "train_3hop" in FILES
    for name in FILES:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (DEFAULT_TASK_DIR / f"{name}.jsonl").read_bytes(), name


def test_three_hop_variant_files():
    """Equal shares of one, two and three hops about the same people as the default split; every three-hop
    question's gold passages chain: each names the next hop's query, the last the answer."""
    corpus = {json.loads(line)["id"]: json.loads(line)["contents"] for line in (DEFAULT_TASK_DIR / "corpus.jsonl").read_text().splitlines()}
    rows = {split: [json.loads(line) for line in (DEFAULT_TASK_DIR / f"{split}_3hop.jsonl").read_text().splitlines()]
            for split in ("train", "test")}
    for split, count in (("train", 400), ("test", 100)):
        sources = [r["data_source"] for r in rows[split]]
        assert {s: sources.count(s) for s in set(sources)} == {"default-1hop": count, "default-2hop": count, "default-3hop": count}
    people = {split: {r["hops"][0][0] for r in rows[split]} for split in rows}
    default_test = {r["hops"][0][0] for r in map(json.loads, (DEFAULT_TASK_DIR / "test.jsonl").read_text().splitlines())}
    assert not people["train"] & people["test"] and not people["train"] & default_test  # no test person trained on
    for r in (r for split in rows.values() for r in split if r["data_source"] == "default-3hop"):
        texts = [corpus[gold] for _, gold in r["hops"]]
        targets = [query for query, _ in r["hops"][1:]] + r["golden_answers"]
        assert len(texts) == 3 and all(t in text for t, text in zip(targets, texts)), r["question"]


# ----------------------------------------------------------------------------------------------------------------
# BM25


def test_bm25_finds_the_gold_passage(default_retriever):
    rows = [json.loads(line) for line in (DEFAULT_TASK_DIR / "test.jsonl").read_text().splitlines()][:40]
    results = default_retriever.search([r["question"] for r in rows], 3)
    for row, hits in zip(rows, results):
        assert len(hits) == 3 and hits[0].score >= hits[1].score >= hits[2].score
        assert row["hops"][0][1] in {p.id for p in hits}, row["question"]
    assert default_retriever.search(["zzzzqqq"], 3) == [[]]  # no known word: no arbitrary passages
    assert default_retriever.search(["q", "the", "", "  "], 3) == [[], [], [], []]  # no word left after tokenising
    assert default_retriever.search([], 3) == []


def test_bm25_cache_is_reused_and_invalidated(tmp_path):
    corpus = tmp_path / "c.jsonl"
    docs = [{"id": str(i), "contents": f"Title {i}\nword{i} shared text"} for i in range(20)]
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    first = BM25Retriever(corpus, cache_dir=tmp_path / "cache")
    again = BM25Retriever(corpus, cache_dir=tmp_path / "cache")
    assert first.built and not again.built and again.index_dir == first.index_dir
    assert again.search(["word7"], 2) == first.search(["word7"], 2)
    assert first.search(["word7"], 2)[0][0].id == "7"
    docs[7]["contents"] = "Title 7\nsomething else entirely"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    changed = BM25Retriever(corpus, cache_dir=tmp_path / "cache")
    assert changed.built and changed.index_dir != first.index_dir
    assert changed.search(["word7"], 2) == [[]]


def test_a_torn_cached_index_is_built_again_with_one_line(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "contents": f"Title {i}\nword{i} text"}) + "\n" for i in range(20)))
    first = BM25Retriever(corpus, cache_dir=tmp_path / "cache")
    vocab = first.index_dir / "vocab.index.json"
    vocab.write_text(vocab.read_text()[:10])  # a copy or a write cut short
    again = BM25Retriever(corpus, cache_dir=tmp_path / "cache")
    [line] = capsys.readouterr().out.strip().splitlines()
    assert line.startswith(f"note: the cached BM25 index in {first.index_dir} cannot be read (") and line.endswith("built again")
    assert again.built and again.search(["word7"], 2) == first.search(["word7"], 2)
    assert not BM25Retriever(corpus, cache_dir=tmp_path / "cache").built  # the rebuilt index reads


def test_bad_corpus_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "1"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl: line 1 has no field 'contents'"):
        BM25Retriever(bad, cache_dir=tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# HTTP: the real server on loopback, and small misbehaving servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            requests.post(url, json={"queries": [], "topk": 1}, timeout=1)
            return
        except requests.ConnectionError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


@pytest.fixture(scope="module")
def retrieval_server(tmp_path_factory):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "retrieval_server.py", "--corpus", str(DEFAULT_TASK_DIR / "corpus.jsonl"), "--port", str(port),
         "--cache-dir", str(tmp_path_factory.mktemp("server-bm25"))],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}/retrieve"
    try:
        wait_until_up(url)
        assert proc.stdout.readline().strip() == f"retrieval server: 2056 passages, POST {url}"  # where it listens
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("flags, message", [
    (["--port", "99999"], "--port must be in 1..65535, got 99999"), (["--port", "0"], "--port must be in 1..65535, got 0"),
    (["--max-topk", "0"], "--max-topk must be >= 1, got 0"), (["--corpus", "/no/such.jsonl"], "error: --corpus: /no/such.jsonl: no such corpus file"),
])
def test_server_refuses_bad_flags_with_one_line(flags, message):
    corpus = [] if "--corpus" in flags else ["--corpus", str(DEFAULT_TASK_DIR / "corpus.jsonl")]
    proc = subprocess.run([sys.executable, "retrieval_server.py", *corpus, *flags], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].endswith(message) and "Traceback" not in proc.stderr


@pytest.mark.parametrize("body", ['{"queries": ["x"], "topk": NaN}', '{"queries": ["x"], "topk": Infinity}',
                                  '{"queries": ["x"], "topk": -Infinity, "return_scores": NaN}', '{"queries": [NaN]}'])
def test_server_answers_non_finite_numbers_with_a_422(retrieval_server, body):
    response = requests.post(retrieval_server, data=body, headers={"content-type": "application/json"}, timeout=10)
    assert response.status_code == 422 and response.json()["detail"]


def test_http_client_and_server_agree_with_in_process_bm25(retrieval_server, default_retriever):
    queries = ["Mobin Pigubor", "In which country is the town of Sirun?", "zzzzqqq"]
    raw = requests.post(retrieval_server, json={"queries": queries[:1], "topk": 2, "return_scores": True}, timeout=10).json()
    assert set(raw) == {"result"} and len(raw["result"]) == 1 and len(raw["result"][0]) == 2
    hit = raw["result"][0][0]
    assert set(hit) == {"document", "score"} and set(hit["document"]) == {"id", "contents"}
    assert hit["document"]["contents"].startswith("Mobin Pigubor\n")
    plain = requests.post(retrieval_server, json={"queries": queries[:1], "topk": 2}, timeout=10).json()
    assert plain["result"][0][0] == hit["document"]  # without scores, Search-R1 returns the documents themselves
    default_k = requests.post(retrieval_server, json={"queries": queries[:1], "topk": None}, timeout=10).json()
    assert default_k["result"][0][:2] == plain["result"][0] and len(default_k["result"][0]) == 3  # null: k = 3
    for body, message in [({"queries": queries[:1], "topk": 0}, "topk must be in 1..50, got 0"),
                          ({"queries": queries[:1], "topk": 100_000}, "topk must be in 1..50, got 100000"),
                          ({"queries": ["q"] * 1025}, "at most 1024 queries per request, got 1025"),
                          ({"queries": ["q" * 2001]}, "a query has at most 2000 characters, got one of 2001")]:
        refused = requests.post(retrieval_server, json=body, timeout=10)
        assert refused.status_code == 422 and message in refused.json()["detail"]
        with pytest.raises(RetrievalError, match=f"refused the request \\(422\\).*{message}"):  # at once, no retry
            HttpRetriever(retrieval_server, retries=0, batch_size=2000).search(body["queries"], body.get("topk", 3))
    assert requests.post(retrieval_server, json={"topk": 2}, timeout=10).status_code == 422  # no queries
    client = HttpRetriever(retrieval_server, batch_size=2)  # 3 queries: two requests
    got, want = client.search(queries, 3), default_retriever.search(queries, 3)
    assert [[(p.id, p.contents) for p in hits] for hits in got] == [[(p.id, p.contents) for p in hits] for hits in want]
    assert [p.score for hits in got for p in hits] == pytest.approx([p.score for hits in want for p in hits])


class ToyServer:
    """A uvicorn server in a thread, answering /retrieve with a behaviour chosen by the test."""

    def __init__(self, handler):
        import uvicorn
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse, PlainTextResponse

        app, self.calls = FastAPI(), 0

        @app.post("/retrieve")
        async def retrieve(request: Request):
            self.calls += 1
            status, body = handler(self.calls, await request.json())
            if isinstance(body, str):
                return PlainTextResponse(body, status_code=status)
            return JSONResponse(body, status_code=status)

        self.url = f"http://127.0.0.1:{free_port()}/retrieve"
        port = int(self.url.split(":")[2].split("/")[0])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def good_body(payload):
    return {"result": [[{"document": {"id": "1", "contents": f"T\n{q}"}, "score": 1.0}] for q in payload["queries"]]}


def test_http_retries_then_succeeds():
    with ToyServer(lambda n, payload: (503, "busy") if n <= 2 else (200, good_body(payload))) as server:
        hits = HttpRetriever(server.url, retries=2, backoff=0.01).search(["q"], 1)
        assert server.calls == 3 and hits == [[Passage("1", "T\nq", 1.0)]]


@pytest.mark.parametrize("status", [400, 404, 422])
def test_http_refusal_is_not_retried(status):
    with ToyServer(lambda n, payload: (status, {"detail": "no such thing"})) as server:
        with pytest.raises(RetrievalError, match=f"refused the request \\({status}\\).*no such thing"):
            HttpRetriever(server.url, retries=3, backoff=0.01).search(["q"], 1)
        assert server.calls == 1


def test_http_too_many_requests_is_retried():
    with ToyServer(lambda n, payload: (429, "slow down") if n == 1 else (200, good_body(payload))) as server:
        assert HttpRetriever(server.url, retries=1, backoff=0.01).search(["q"], 1) == [[Passage("1", "T\nq", 1.0)]]
        assert server.calls == 2


def test_http_gives_up_with_a_clear_error():
    with ToyServer(lambda n, payload: (503, "busy")) as server:
        with pytest.raises(RetrievalError, match=f"{server.url} failed after 3 attempts"):
            HttpRetriever(server.url, retries=2, backoff=0.01).search(["q"], 1)
        assert server.calls == 3


def test_http_server_down():
    url = f"http://127.0.0.1:{free_port()}/retrieve"  # nothing listens there
    start = time.time()
    with pytest.raises(RetrievalError, match=f"{url} failed after 3 attempts"):
        HttpRetriever(url, retries=2, backoff=0.1).search(["q"], 1)
    assert time.time() - start >= 0.1 + 0.2  # the backoff between the attempts


def test_http_slow_server_times_out():
    def slow(n, payload):
        time.sleep(1.0)
        return 200, good_body(payload)

    with ToyServer(slow) as server:
        start = time.time()
        with pytest.raises(RetrievalError, match="failed after 2 attempts"):
            HttpRetriever(server.url, timeout=0.2, retries=1, backoff=0.01).search(["q"], 1)
        assert time.time() - start < 5


@pytest.mark.parametrize(
    "body",
    ["not json", {"results": []}, {"result": []}, {"result": [[{"document": {"id": "1"}, "score": 1.0}]]}, {"result": [["x"]]},
     # fields of the wrong type: never an observation of "{'a': 1}" or a score of NaN
     {"result": [[{"document": {"id": "1", "contents": {"a": 1}}, "score": 1.0}]]},
     {"result": [[{"document": {"id": "1", "contents": ["T", "x"]}, "score": 1.0}]]},
     {"result": [[{"document": {"id": "1", "contents": "T\nx"}, "score": "1.0"}]]},
     '{"result": [[{"document": {"id": "1", "contents": "T"}, "score": NaN}]]}',  # Python's json reads NaN
     {"result": [[{"document": {"id": "1", "contents": "T\nx"}, "score": True}]]}],
)
def test_http_malformed_response(body):
    with ToyServer(lambda n, payload: (200, body)) as server:
        with pytest.raises(RetrievalError, match="malformed response"):
            HttpRetriever(server.url, retries=0).search(["q"], 1)


def test_a_server_sending_more_or_longer_passages_than_asked_is_cut_to_the_run_and_counted(tokenizer):
    """200 passages for --topk 3, each 4,400 characters without a title line: the observation holds 3, each cut to
    --passage-chars, and the turn counts the 200 passages it cut (197 beyond topk, 3 too long)."""
    def flood(n, payload):
        return 200, {"result": [[{"document": {"id": str(j), "contents": "y" * 4400}, "score": 1.0} for j in range(200)]
                                for _ in payload["queries"]]}

    with ToyServer(flood) as server:
        env = SearchEnv(tokenizer, HttpRetriever(server.url, retries=0), topk=3, passage_chars=50)
        [result] = env.step([StepRequest(Task("q", ["a"]), [], encode(tokenizer, "<search> who </search>"), 1)])
    observation = result.info["observation"]
    assert observation.count("Doc ") == 3 and "Doc 4" not in observation
    assert observation.count("y" * 50) == 3 and "y" * 51 not in observation
    assert result.info["passages_cut"] == 200


@pytest.mark.parametrize("url", ["127.0.0.1:8000/retrieve", "ftp://127.0.0.1/retrieve", "http://"])
def test_http_invalid_url_is_named_as_such(url):
    with pytest.raises(RetrievalError, match="not a valid http\\(s\\) URL"):
        HttpRetriever(url, retries=0).search(["q"], 1)


def test_a_retriever_without_one_result_list_per_query_is_an_error(tokenizer):
    class Short:  # a custom retriever that drops a query's results
        def search(self, queries, topk):
            return [[] for _ in queries[1:]]

    env = SearchEnv(tokenizer, Short(), max_turns=3)
    turns = [StepRequest(Task("q", ["a"]), [1], encode(tokenizer, f"<search> q{i} </search>"), 1) for i in range(2)]
    with pytest.raises(RetrievalError, match="the retriever returned 1 result lists for 2 queries"):
        env.step(turns)


# ----------------------------------------------------------------------------------------------------------------
# The environment, driven by scripted turns through the real tokenizer


def encode(tokenizer, text, eos=False):
    return tokenizer.encode(text, add_special_tokens=False) + ([tokenizer.eos_token_id] if eos else [])


def test_mixed_batch_steps_in_one_retrieval_call(tokenizer, default_retriever):
    calls = []

    class CountingRetriever:
        def search(self, queries, topk):
            calls.append(list(queries))
            return default_retriever.search(queries, topk)

    env = SearchEnv(tokenizer, CountingRetriever(), max_turns=3, max_length=400)
    task = Task("In which town was Mobin Pigubor born?", ["Sirun"], "default-1hop")
    prompt = build_prompt(tokenizer, task.question)
    turns = [
        ("<think> look it up </think>\n<search> Mobin Pigubor </search>", False, 1),
        ("<think> ok </think>\n<answer> Sirun </answer>", False, 2),
        ("<answer> the sirun </answer>", True, 1),  # EM after normalisation, EOS after the answer
        ("<answer> Paris </answer>", False, 1),
        ("I do not know", False, 1),  # invalid: feedback, the episode goes on
        ("I do not know", True, 1),  # invalid and EOS: the episode ends
        ("<search> Pen Pigubor </search>", False, 3),  # the last allowed turn: no search, no reward
        ("<search> Lis Rebal </search>", False, 2),  # the observation would pass max_length
    ]
    contexts = [prompt] * 7 + [prompt + [0] * 250]
    requests_ = [StepRequest(task, ctx, encode(tokenizer, text, eos), n) for (text, eos, n), ctx in zip(turns, contexts)]
    results = env.step(requests_)
    assert calls == [["Mobin Pigubor", "Lis Rebal"]]  # one call, only the searches that will be answered
    ends = [(r.done, r.info.get("end"), r.reward) for r in results]
    assert ends == [
        (False, None, None),
        (True, "answer", 1.0),
        (True, "answer", 1.0),
        (True, "answer", 0.0),
        (False, None, None),
        (True, "eos", 0.0),
        (True, "max_turns", 0.0),
        (True, "max_length", 0.0),
    ]
    assert all(str(r.reward) == "0.0" for r in results[5:])  # not -0.0 (it would show in logs and tree JSON)
    search = results[0]
    assert tokenizer.decode(search.obs_ids) == search.info["observation"]
    assert search.info["observation"].startswith("\n\n<information>Doc 1 (Title: Mobin Pigubor) Mobin Pigubor (born")
    assert "born in the town of Sirun" in search.info["observation"]
    assert tokenizer.decode(results[4].obs_ids) == INVALID_ACTION
    assert results[3].info["f1"] == 0.0 and results[2].info["f1"] == 1.0


def test_format_penalty_only_without_an_answer(tokenizer, default_retriever):
    env = SearchEnv(tokenizer, default_retriever, format_penalty=0.5)
    task = Task("q", ["a"])
    results = env.step([StepRequest(task, [], encode(tokenizer, "<answer> b </answer>"), 1),
                        StepRequest(task, [], encode(tokenizer, "nothing", eos=True), 1)])
    assert [r.reward for r in results] == [0.0, -0.5]


def test_passages_are_cut_to_length():
    passages = [Passage("1", "Title\n" + "x" * 50, 2.0), Passage("2", "Other\nshort", 1.0), Passage("3", "z" * 30, 0.5)]
    text = format_passages(passages, 20)
    assert text == ("\n\n<information>Doc 1 (Title: Title) " + "x" * 20 + "\nDoc 2 (Title: Other) short\n"
                    "Doc 3 (Title: " + "z" * 20 + ") </information>\n\n")  # no title line: all of it is the title, cut too
    assert format_passages([], 20) == "\n\n<information>No results.</information>\n\n"


def test_episode_through_the_tree_masks_observations(tokenizer, default_retriever):
    """grow_trees + SearchEnv with a scripted generator: observation tokens get mask 0, turns mask 1."""
    env = SearchEnv(tokenizer, default_retriever, max_turns=4)
    task = Task("In which country was Lis Rebal born?", ["whatever"], "default-2hop")
    script = ["<think> a </think>\n<search> Lis Rebal </search>", "<search> Damal </search>", "<answer> Gevunal </answer>"]

    def generate(contexts):
        out = []
        for ctx in contexts:
            n_obs = tokenizer.decode(ctx).count("<information>") + tokenizer.decode(ctx).count("Invalid action")
            ids = encode(tokenizer, script[min(n_obs - 1, 2)] if n_obs else script[0])
            out.append((ids, [-0.5] * len(ids)))
        return out

    prompt = build_prompt(tokenizer, task.question)
    tree = grow_trees([prompt], [task], BatchSampler(generate), env.step, m=2, l=1, k=1, rng=random.Random(0))[0]
    for row in tree.trajectories():
        model_text = tokenizer.decode([t for t, m in zip(row.response_ids, row.response_mask) if m])
        obs_text = tokenizer.decode([t for t, m in zip(row.response_ids, row.response_mask) if not m])
        assert model_text == "".join(script)
        assert obs_text.count("<information>") == 2 and "<search>" not in obs_text
        assert tree.nodes[row.leaf].info["end"] == "answer"


def test_every_field_has_its_type_checked_and_odd_files_are_read_or_named(tmp_path):
    """NaN as an answer, a list as a data source or as a passage, a corpus of empty passages: each an error naming
    the file and line; a byte-order mark is read; a directory is called a directory."""
    def write(name: str, *records: str, bom: bool = False) -> Path:
        path = tmp_path / name
        path.write_text(("\ufeff" if bom else "") + "\n".join(records) + "\n", encoding="utf-8")
        return path

    refused = [
        (load_tasks, write("nan.jsonl", '{"question": "Q?", "golden_answers": [NaN]}'), "line 1: answers must be a string"),
        (load_tasks, write("source.jsonl", '{"question": "Q?", "golden_answers": ["Ann"], "data_source": ["x"]}'),
         "line 1: data_source must be a string"),
        (read_corpus, write("list.jsonl", '{"id": "1", "contents": ["T", "x"]}'), "line 1: the id must be a string or a number and contents a string"),
        (read_corpus, write("nan_id.jsonl", '{"id": NaN, "contents": "T\\nx"}'), "line 1: the id must be"),
        (read_corpus, write("blank.jsonl", '{"id": "1", "contents": ""}', '{"id": "2", "contents": "  "}'), "the corpus has no passage with text"),
        (load_tasks, tmp_path, "is a directory, not a data file"),
        (read_corpus, tmp_path, "is a directory, not a corpus file"),
    ]
    for reader, path, said in refused:
        with pytest.raises(ValueError) as err:
            reader(path)
        assert str(path) in str(err.value) and said in str(err.value), (path, str(err.value))
    tasks = load_tasks(write("bom.jsonl", '{"question": "Q?", "golden_answers": ["Ann", 1999]}', bom=True))
    assert [(t.question, t.answers) for t in tasks] == [("Q?", ["Ann", "1999"])]  # a number is its text, on purpose
    assert read_corpus(write("bom_corpus.jsonl", '{"id": 7, "contents": "T\\nx"}', bom=True)) == [{"id": "7", "contents": "T\nx"}]
