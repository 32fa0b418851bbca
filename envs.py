"""The Search-R1-style search environment: tag protocol, observations, EM reward, retrievers, data loaders.

The model writes <think>...</think>, then either <search>query</search> (the environment appends
<information>top-k passages</information>) or <answer>text</answer>. Generation stops at </search> or
</answer> (or EOS). Anything else is an invalid action: it gets a short observation saying how to act and counts
as a turn. The reward is exact match against any gold answer after SQuAD normalisation.

Retrievers: `BM25Retriever` (in-process, bm25s, index cached on disk) and `HttpRetriever` (a client of the
Search-R1 `/retrieve` protocol; `retrieval_server.py` serves it). `SearchEnv.step` matches the `step` callable
of `atpo_tree.grow_trees`.
"""

import hashlib
import json
import math
import re
import string
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from atpo_tree import StepRequest, StepResult

DEFAULT_TASK_DIR = Path(__file__).parent / "data" / "default"

INSTRUCTION = (
    "Answer the question below. Think step by step inside <think> and </think>. If you need facts, search "
    "by writing <search> your query </search>; the results come back between <information> and "
    "</information>. Search as often as you need. When you know the answer, write only the short answer "
    "inside <answer> and </answer>, for example <answer> Paris </answer>.\n\nQuestion: "
)
INVALID_ACTION = (
    "\nInvalid action. To search, write <search> query </search>. To answer, write <answer> answer </answer>.\n"
)


# ----------------------------------------------------------------------------------------------------------------
# Answers: SQuAD normalisation, exact match, token F1


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golds: list[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer; a gold answer that normalises to nothing
    ("The", ".") matches nothing (else an answer of articles or punctuation would score)."""
    norm = normalize_answer(prediction)
    return float(any(norm == normalize_answer(g) for g in golds if normalize_answer(g)))


def f1_score(prediction: str, golds: list[str]) -> float:
    """SQuAD token F1, the best over the gold answers."""
    pred_tokens = normalize_answer(prediction).split()
    best = 0.0
    for gold in golds:
        gold_tokens = normalize_answer(gold).split()
        common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
        if common:
            precision, recall = common / len(pred_tokens), common / len(gold_tokens)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


# ----------------------------------------------------------------------------------------------------------------
# Tasks and the formats people already have


@dataclass
class Task:
    question: str
    answers: list[str]
    source: str = ""  # data source, for EM per source (e.g. "nq", "hotpotqa", "default-2hop")


def _require(record: dict, key: str, where: str) -> Any:
    if key not in record or record[key] is None:
        raise ValueError(f"{where} has no field {key!r}")
    return record[key]


def _is_text(value: Any) -> bool:
    """Text, or a finite number that stands for its text (a year, a count); not a bool, NaN, a list or an object."""
    return isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))


def _answer_list(value: Any, where: str) -> list[str]:
    values = [value] if _is_text(value) else value
    if not isinstance(values, list) or not all(_is_text(a) for a in values):
        raise ValueError(f"{where}: answers must be a string or a list of strings, got {value!r:.80}")
    if not any(normalize_answer(str(a)) for a in values):
        raise ValueError(f"{where}: no gold answer left after normalisation (empty, or only articles and punctuation): {value!r:.80}")
    return [str(a) for a in values]


def read_jsonl(path: Path) -> list[tuple[int, Any]]:
    """(1-based line number, record) for every non-blank line; a line that is not JSON is an error naming it."""
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):  # a byte-order mark is read
        if line.strip():
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {number} is not valid JSON ({err})") from None
    return records


def load_tasks(path: str | Path) -> list[Task]:
    """Questions from FlashRAG-style JSONL (`question`, `golden_answers`) or Search-R1 processed parquet
    (`question`, and `golden_answers` or `reward_model.ground_truth.target`; `data_source` if present)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, not a data file")
    if not path.exists():
        raise FileNotFoundError(f"no such data file: {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises several kinds for a file that is not parquet
            raise ValueError(f"{path}: not a readable parquet file ({err})") from None
        records = [(f"row {number}", record) for number, record in enumerate(table.to_pylist(), start=1)]
    elif path.suffix in (".jsonl", ".json"):
        records = [(f"line {number}", record) for number, record in read_jsonl(path)]
    else:
        raise ValueError(f"{path}: expected a .jsonl or .parquet file")
    tasks = []
    for place, record in records:
        where = f"{path}: {place}"
        if not isinstance(record, dict):
            raise ValueError(f"{where} is not an object with a question, got {record!r:.80}")
        question = _require(record, "question", where)
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: the question must be a non-empty string, got {question!r:.80}")
        question = question.strip()
        if record.get("golden_answers") is not None:
            answers = _answer_list(record["golden_answers"], where)
        elif isinstance(record.get("reward_model"), dict):
            truth = _require(record["reward_model"], "ground_truth", where)
            answers = _answer_list(_require(truth, "target", where) if isinstance(truth, dict) else truth, where)
        else:
            raise ValueError(f"{where} has no field 'golden_answers' (nor reward_model.ground_truth)")
        source = record.get("data_source") or ""
        if not isinstance(source, str):
            raise ValueError(f"{where}: data_source must be a string, got {source!r:.80}")
        tasks.append(Task(question, answers, source))
    if not tasks:
        raise ValueError(f"{path}: no questions")
    return tasks


# ----------------------------------------------------------------------------------------------------------------
# Retrieval


class Passage(NamedTuple):
    id: str
    contents: str  # first line: the title (Search-R1 / FlashRAG corpus format)
    score: float

    @property
    def title(self) -> str:
        return self.contents.split("\n", 1)[0].strip().strip('"')

    @property
    def text(self) -> str:
        parts = self.contents.split("\n", 1)
        return parts[1].strip() if len(parts) > 1 else ""


def read_corpus(path: str | Path) -> list[dict]:
    """A JSONL corpus of {"id", "contents"} records; a bad line is an error naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: is a directory, not a corpus file" if path.is_dir() else f"{path}: no such corpus file")
    docs = []
    for number, record in read_jsonl(path):
        where = f"{path}: line {number}"
        if not isinstance(record, dict):
            raise ValueError(f"{where} is not an object with an id and contents, got {record!r:.80}")
        doc_id, contents = _require(record, "id", where), _require(record, "contents", where)
        if not _is_text(doc_id) or not isinstance(contents, str):
            raise ValueError(f"{where}: the id must be a string or a number and contents a string, got {record!r:.80}")
        docs.append({"id": str(doc_id), "contents": contents})
    if not any(d["contents"].strip() for d in docs):
        raise ValueError(f"{path}: the corpus has no passage with text" if docs else f"{path}: the corpus is empty")
    return docs


class BM25Retriever:
    """In-process BM25 (bm25s) over a JSONL corpus. The index is cached under `cache_dir`, keyed by a hash of the
    corpus file, so it is rebuilt only when the corpus changes."""

    def __init__(self, corpus_path: str | Path, cache_dir: str | Path | None = None, corpus: list[dict] | None = None):
        import bm25s

        from default_model import cache_dir as default_cache_dir

        self.corpus = corpus if corpus is not None else read_corpus(corpus_path)  # read_corpus's, if already read
        digest = hashlib.sha256(Path(corpus_path).read_bytes()).hexdigest()[:16]
        self.index_dir = Path(cache_dir or default_cache_dir() / "bm25") / f"{Path(corpus_path).stem}-{digest}"
        self.built = not (self.index_dir / "params.index.json").exists()
        if not self.built:
            try:
                self.index = bm25s.BM25.load(str(self.index_dir), show_progress=False)
            except Exception as err:  # a cached index torn or half written: built again from the corpus
                print(f"note: the cached BM25 index in {self.index_dir} cannot be read ({type(err).__name__}): built again")
                self.built = True
        if self.built:
            self.index = bm25s.BM25()
            self.index.index(bm25s.tokenize([d["contents"] for d in self.corpus], show_progress=False), show_progress=False)
            self.index.save(str(self.index_dir), show_progress=False)

    def search(self, queries: list[str], topk: int) -> list[list[Passage]]:
        import bm25s

        if not queries:
            return []
        import numpy as np

        k = min(topk, len(self.corpus))
        pool = min(4 * k, len(self.corpus))  # candidates; equal scores are then ranked by corpus order
        tokens = bm25s.tokenize(list(queries), show_progress=False)
        doc_ids, scores = self.index.retrieve(tokens, k=pool, show_progress=False, n_threads=1)
        words = bm25s.tokenize(list(queries), return_ids=False, show_progress=False)
        results = []
        for query_words, row_ids, row_scores in zip(words, doc_ids, scores):
            if pool < len(self.corpus) and row_scores[k - 1] > 0 and row_scores[k - 1] == row_scores[pool - 1]:
                # the k-th score's ties may reach past the candidates: score every passage (ties at 0 are dropped)
                row_scores = self.index.get_scores(query_words)
                row_ids = np.arange(len(row_scores))
            # ties in corpus order, not in the order a SIMD top-k happens to leave them (it differs between CPUs)
            best = np.lexsort((row_ids, -np.round(row_scores, 4)))[:k]
            # a query with no known word scores 0 everywhere: return nothing rather than arbitrary passages
            results.append([Passage(self.corpus[i]["id"], self.corpus[i]["contents"], float(s))
                            for i, s in zip(row_ids[best].tolist(), row_scores[best].tolist()) if s > 0])
        return results


class RetrievalError(RuntimeError):
    pass


class HttpRetriever:
    """Client of the Search-R1 retrieval protocol: POST {url} with {"queries", "topk", "return_scores": true},
    answer {"result": [[{"document": {"contents", ...}, "score"}, ...], ...]}. Transient failures (connection,
    timeout, 5xx, 429) get bounded retries with exponential backoff; a refusal (any other 4xx) is a RetrievalError
    at once, with the server's message. After the retries, a RetrievalError naming the URL, never an empty result."""

    def __init__(self, url: str, timeout: float = 30.0, retries: int = 3, backoff: float = 0.5, batch_size: int = 512):
        import requests

        self.url, self.timeout, self.retries, self.backoff, self.batch_size = url, timeout, retries, backoff, batch_size
        self.session = requests.Session()

    def _post(self, queries: list[str], topk: int) -> list[list[Passage]]:
        import requests

        payload = {"queries": queries, "topk": topk, "return_scores": True}
        for attempt in range(self.retries + 1):
            try:
                response = self.session.post(self.url, json=payload, timeout=self.timeout)
                if 400 <= response.status_code < 500 and response.status_code != 429:
                    raise RetrievalError(f"retrieval server {self.url} refused the request "
                                         f"({response.status_code}): {response.text[:500]}")
                response.raise_for_status()
                return self._parse(response.json(), len(queries))
            except (requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema, requests.exceptions.InvalidURL) as err:
                raise RetrievalError(f"retrieval server {self.url}: not a valid http(s) URL ({err})") from None
            except (requests.ConnectionError, requests.Timeout, requests.HTTPError) as err:
                if attempt == self.retries:
                    raise RetrievalError(
                        f"retrieval server {self.url} failed after {self.retries + 1} attempts: {err}"
                    ) from err
                time.sleep(self.backoff * 2**attempt)
            except ValueError as err:  # not JSON
                raise RetrievalError(f"retrieval server {self.url} sent a malformed response: {err}") from err
        raise AssertionError("unreachable")

    def _parse(self, body: Any, num_queries: int) -> list[list[Passage]]:
        try:
            rows = body["result"]
            if len(rows) != num_queries:
                raise ValueError(f"{len(rows)} result lists for {num_queries} queries")
            return [[self._passage(hit) for hit in row] for row in rows]
        except (KeyError, TypeError, ValueError) as err:
            raise RetrievalError(f"retrieval server {self.url} sent a malformed response: {err!r}") from None

    @staticmethod
    def _passage(hit: Any) -> Passage:
        """One hit of the protocol, its fields' types checked: text is text, a score a finite number."""
        contents, score = hit["document"]["contents"], hit["score"]
        if not isinstance(contents, str) or isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise ValueError(f"a hit needs text contents and a finite score, got {str(hit)[:200]}")
        return Passage(str(hit["document"].get("id", "")), contents, float(score))

    def search(self, queries: list[str], topk: int) -> list[list[Passage]]:
        results = []
        for start in range(0, len(queries), self.batch_size):
            results += self._post(list(queries[start : start + self.batch_size]), topk)
        return results


# ----------------------------------------------------------------------------------------------------------------
# The tool protocol


class Action(NamedTuple):
    kind: str  # "search", "answer" or "invalid"
    content: str  # the query or the answer; for invalid, why


STOP = ["</search>", "</answer>"]  # a turn ends at the first of these, kept in the turn (both engines stop there)
TAGS = ("<search>", "</search>", "<answer>", "</answer>", "<information>", "</information>")


def parse_action(text: str) -> Action:
    """The action of one model turn. Never raises.

    The first closing tag (</search> or </answer>) decides: it is where a stop-string engine stops. Its content
    is the text after the last matching opening tag before it. Empty content, or content that still holds a
    protocol tag, is invalid.
    """
    closes = [(text.find(f"</{kind}>"), kind) for kind in ("search", "answer")]
    closes = [(pos, kind) for pos, kind in closes if pos >= 0]
    if not closes:
        return Action("invalid", "no </search> or </answer>")
    close, kind = min(closes)
    opening = text.rfind(f"<{kind}>", 0, close)
    if opening < 0:
        return Action("invalid", f"</{kind}> without <{kind}>")
    content = text[opening + len(kind) + 2 : close].strip()
    if not content:
        return Action("invalid", f"empty <{kind}>")
    if any(tag in content for tag in TAGS):
        return Action("invalid", f"a tag inside <{kind}>")
    return Action(kind, content)


def format_passages(passages: list[Passage], max_chars: int) -> str:
    """The observation for a search: each passage as "Doc i (Title: ...) text", its title and its text each cut to
    max_chars (a passage without a title line is all title)."""
    if not passages:
        return "\n\n<information>No results.</information>\n\n"
    docs = [f"Doc {i} (Title: {p.title[:max_chars]}) {p.text[:max_chars]}" for i, p in enumerate(passages, start=1)]
    return "\n\n<information>" + "\n".join(docs) + "</information>\n\n"


def build_prompt(tokenizer: Any, question: str) -> list[int]:
    """Prompt token ids: the instruction and question as a user message, through the chat template, with the
    assistant turn opened. Turns and observations are appended to it as raw tokens."""
    messages = [{"role": "user", "content": INSTRUCTION + question.strip()}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])


# ----------------------------------------------------------------------------------------------------------------
# The environment


@dataclass
class SearchEnv:
    tokenizer: Any
    retriever: Any  # anything with .search(queries, topk) -> list[list[Passage]]
    topk: int = 3
    passage_chars: int = 1000
    max_turns: int = 6  # model turns per episode
    max_length: int = 8192  # prompt + response tokens
    format_penalty: float = 0.0  # subtracted from the reward of an episode that ends without an answer
    seconds: float = field(default=0.0, init=False)  # time spent in step() so far, retrieval included

    def step(self, requests: list[StepRequest]) -> list[StepResult]:
        """Answer a batch of model turns (one per episode); every search of the batch goes to the retriever in
        one call. A turn ends the episode on an answer, EOS, the last allowed turn, or the length limit."""
        start = time.time()
        texts = self.tokenizer.batch_decode([r.turn_ids for r in requests], skip_special_tokens=True)
        actions = [parse_action(t) for t in texts]
        searches = [
            i for i, (r, a) in enumerate(zip(requests, actions)) if a.kind == "search" and r.turn_number < self.max_turns
        ]
        found = self.retriever.search([actions[i].content for i in searches], self.topk) if searches else []
        if len(found) != len(searches):
            raise RetrievalError(f"the retriever returned {len(found)} result lists for {len(searches)} queries")
        passages = dict(zip(searches, found))

        results = []
        for i, (request, action) in enumerate(zip(requests, actions)):
            info = {"action": action.kind, "content": action.content, "turn": request.turn_number}
            if action.kind == "answer":
                task = request.task
                em, f1 = exact_match(action.content, task.answers), f1_score(action.content, task.answers)
                results.append(self._end(info, "answer", em, f1))
                continue
            if request.turn_ids and request.turn_ids[-1] == self.tokenizer.eos_token_id and action.kind != "search":
                results.append(self._end(info, "eos"))
                continue
            if request.turn_number >= self.max_turns:
                results.append(self._end(info, "max_turns"))
                continue
            observation = INVALID_ACTION
            if i in passages:  # a server may send more passages than asked, or longer ones: cut, and counted
                kept = passages[i][: self.topk]
                info["passages_cut"] = len(passages[i]) - len(kept) + sum(max(len(p.title), len(p.text)) > self.passage_chars for p in kept)
                observation = format_passages(kept, self.passage_chars)
            obs_ids = self.tokenizer.encode(observation, add_special_tokens=False)
            if len(request.context_ids) + len(request.turn_ids) + len(obs_ids) >= self.max_length:
                results.append(self._end(info, "max_length"))
                continue
            info["observation"] = observation
            results.append(StepResult(obs_ids, False, None, info))
        self.seconds += time.time() - start
        return results

    def _end(self, info: dict, reason: str, em: float | None = None, f1: float = 0.0) -> StepResult:
        reward = em if em is not None else 0.0 - self.format_penalty  # not -penalty: that is -0.0 with no penalty
        info.update(end=reason, em=em or 0.0, f1=f1)
        return StepResult([], True, reward, info)
