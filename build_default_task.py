"""Build the embedded default task: a seeded fictional world whose facts can only be found by searching.

    python build_default_task.py                  # rebuilds data/default/ byte for byte, then measures it

Countries, towns, companies and people with invented names, written as short encyclopedia-style passages
(Search-R1 corpus format: {"id", "contents"}, the title on the first line). A person's passage names their
birth town but not its country, and their employer but not where it is based, so two-hop questions need two
searches. Writes corpus.jsonl, train.jsonl, test.jsonl (FlashRAG-style: question, golden_answers, data_source)
and demos.jsonl (gold transcripts made with the real BM25 retriever, for the supervised warm start), and the same
three for a three-hop variant on the same corpus and people (train_3hop.jsonl, test_3hop.jsonl, demos_3hop.jsonl:
single-, two- and three-hop questions in equal shares; a three-hop question, e.g. "What is the capital of the
country where X was born?", needs three searches).

Then prints the BM25 top-3 recall of the gold passage for single-hop test questions queried verbatim, and the
closed-book exact match of the default model on the test questions (no search), which should be near 0.
"""

import argparse
import json
import random
import tempfile
from pathlib import Path

from envs import DEFAULT_TASK_DIR, BM25Retriever, exact_match, format_passages, normalize_answer

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
OCCUPATIONS = ["botanist", "carpenter", "teacher", "engineer", "painter", "surgeon", "librarian", "chemist",
               "architect", "baker", "pilot", "geologist", "translator", "sculptor", "nurse", "astronomer"]
INDUSTRIES = ["Textiles", "Shipping", "Foundry", "Mills", "Brewery", "Instruments", "Ceramics", "Printing",
              "Rail", "Glassworks", "Timber", "Pharmaceuticals"]
RIVERS = 30
FILES = ("corpus", "train", "test", "demos", "train_3hop", "test_3hop", "demos_3hop")

SINGLE_HOP = {
    "birth_town": "In which town was {person} born?",
    "employer": "Which company does {person} work for?",
    "birth_year": "In which year was {person} born?",
    "town_country": "In which country is the town of {town}?",
    "company_town": "In which town are the headquarters of {company}?",
}
TWO_HOP = {
    "birth_country": "In which country was {person} born?",
    "employer_town": "In which town are the headquarters of the company that {person} works for?",
    "employer_founded": "In which year was the company that {person} works for founded?",
}
THREE_HOP = {  # the three-hop variant (files *_3hop.jsonl): person -> town or company -> town -> country
    "birth_capital": "What is the capital of the country where {person} was born?",
    "employer_country": "In which country are the headquarters of the company that {person} works for?",
}


def article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def make_names(rng: random.Random, count: int, taken: set[str], syllables: tuple[int, int]) -> list[str]:
    """Distinct invented words (consonant-vowel syllables plus a closing consonant), none already taken."""
    names = []
    while len(names) < count:
        word = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(rng.randint(*syllables)))
        word = (word + rng.choice("lnrsk")).capitalize()
        if word not in taken:
            taken.add(word)
            names.append(word)
    return names


def build_world(seed: int) -> dict:
    rng = random.Random(seed)
    taken: set[str] = set()
    countries = make_names(rng, 16, taken, (3, 3))
    towns = [{"name": n, "country": rng.choice(countries), "founded": rng.randint(1100, 1850), "river": rng.randrange(RIVERS)}
             for n in make_names(rng, 120, taken, (2, 2))]
    rivers = make_names(rng, RIVERS, taken, (2, 2))
    capitals = {c: rng.choice([t["name"] for t in towns if t["country"] == c] or [t["name"] for t in towns]) for c in countries}
    companies = [{"name": f"{n} {rng.choice(INDUSTRIES)}", "town": rng.choice(towns)["name"], "founded": rng.randint(1850, 1990)}
                 for n in make_names(rng, 120, taken, (2, 3))]
    first, last = make_names(rng, 45, taken, (1, 2)), make_names(rng, 60, taken, (2, 3))
    full_names = rng.sample([f"{f} {l}" for f in first for l in last], 900)
    people = [{"name": n, "town": rng.choice(towns)["name"], "born": rng.randint(1920, 1999),
               "company": rng.choice(companies)["name"], "job": rng.choice(OCCUPATIONS)} for n in full_names]
    for p in people:
        p["since"] = rng.randint(p["born"] + 20, p["born"] + 45)

    corpus = []
    for c in countries:
        corpus.append((f"country-{c}", f"{c}\n{c} is a country. Its capital is {capitals[c]}."))
    for t in towns:
        corpus.append((f"town-{t['name']}", f"{t['name']}\n{t['name']} is a town in the country of {t['country']}. "
                       f"It lies on the {rivers[t['river']]} river and was founded in {t['founded']}."))
    for c in companies:
        industry = c["name"].split(" ", 1)[1].lower()
        corpus.append((f"company-{c['name']}", f"{c['name']}\n{c['name']} is {article(industry)} company founded in "
                       f"{c['founded']}. Its headquarters are in the town of {c['town']}."))
    for p in people:
        corpus.append((f"person-{p['name']}", f"{p['name']}\n{p['name']} (born {p['born']}) is {article(p['job'])}. "
                       f"{p['name']} was born in the town of {p['town']} and grew up there."))
        corpus.append((f"career-{p['name']}", f"{p['name']} (career)\nSince {p['since']}, {p['name']} has worked "
                       f"as {article(p['job'])} for the company {p['company']}."))
    return {"towns": towns, "companies": companies, "people": people, "capitals": capitals,
            "corpus": [{"id": i, "contents": c} for i, c in corpus], "rng": rng}


def person_question(world: dict, kind: str, p: dict) -> dict:
    """A question about person `p`, with the searches that answer it (query, gold passage id) in order."""
    town = next(t for t in world["towns"] if t["name"] == p["town"])
    company = next(c for c in world["companies"] if c["name"] == p["company"])
    company_town = next(t for t in world["towns"] if t["name"] == company["town"])
    person, career = (p["name"], f"person-{p['name']}"), (p["name"], f"career-{p['name']}")
    answer, hops = {
        "birth_town": (p["town"], [person]),
        "employer": (p["company"], [career]),
        "birth_year": (str(p["born"]), [person]),
        "birth_country": (town["country"], [person, (p["town"], f"town-{p['town']}")]),
        "employer_town": (company["town"], [career, (company["name"], f"company-{company['name']}")]),
        "employer_founded": (str(company["founded"]), [career, (company["name"], f"company-{company['name']}")]),
        "birth_capital": (world["capitals"][town["country"]], [person, (p["town"], f"town-{p['town']}"),
                                                               (town["country"], f"country-{town['country']}")]),
        "employer_country": (company_town["country"], [career, (company["name"], f"company-{company['name']}"),
                                                       (company["town"], f"town-{company['town']}")]),
    }[kind]
    template = {**SINGLE_HOP, **TWO_HOP, **THREE_HOP}[kind]
    return {"question": template.format(person=p["name"]), "golden_answers": [answer],
            "data_source": f"default-{len(hops)}hop", "kind": kind, "hops": [list(h) for h in hops]}


def make_questions(world: dict) -> tuple[list[dict], list[dict]]:
    """Train and test questions; test questions are about people, towns and companies no train question asks about
    (the split is kept in world["splits"] for the three-hop variant)."""
    rng = world["rng"]

    def place_question(kind: str, entity: dict) -> dict:
        if kind == "town_country":
            q, answer, hop = SINGLE_HOP[kind].format(town=entity["name"]), entity["country"], (entity["name"], f"town-{entity['name']}")
        else:
            q, answer, hop = SINGLE_HOP[kind].format(company=entity["name"]), entity["town"], (entity["name"], f"company-{entity['name']}")
        return {"question": q, "golden_answers": [answer], "data_source": "default-1hop", "kind": kind, "hops": [list(hop)]}

    people, towns, companies = list(world["people"]), list(world["towns"]), list(world["companies"])
    for items in (people, towns, companies):
        rng.shuffle(items)
    splits = {"train": (people[:720], towns[:96], companies[:96]), "test": (people[720:], towns[96:], companies[96:])}
    out = {}
    for split, (ps, ts, cs) in splits.items():
        single = [person_question(world, k, p) for p in ps for k in ("birth_town", "employer", "birth_year")]
        single += [place_question("town_country", t) for t in ts] + [place_question("company_town", c) for c in cs]
        double = [person_question(world, k, p) for p in ps for k in TWO_HOP]
        n_single, n_double = (1200, 400) if split == "train" else (150, 150)
        questions = rng.sample(single, n_single) + rng.sample(double, n_double)
        rng.shuffle(questions)
        out[split] = questions
    world["splits"] = splits
    return out["train"], out["test"]


def make_three_hop_questions(world: dict, seed: int) -> tuple[list[dict], list[dict]]:
    """The three-hop variant: a third of the questions each single-, two- and three-hop, about the same people as the
    default task's train and test splits (own random draw, so the default files stay as they were)."""
    rng = random.Random(seed + 1)
    out = {}
    for split, (ps, _, _) in world["splits"].items():
        per_hops = [[person_question(world, k, p) for p in ps for k in kinds]
                    for kinds in (("birth_town", "employer", "birth_year"), TWO_HOP, THREE_HOP)]
        count = 400 if split == "train" else 100
        questions = [q for qs in per_hops for q in rng.sample(qs, count)]
        rng.shuffle(questions)
        out[split] = questions
    return out["train"], out["test"]


def make_demo(question: dict, retriever: BM25Retriever, topk: int) -> dict | None:
    """A gold transcript: think -> search -> real retrieved information -> ... -> answer. None if retrieval misses."""
    answer = question["golden_answers"][0]
    hops = question["hops"]
    segments, facts = [], []
    for i, (query, gold_id) in enumerate(hops):
        passages = retriever.search([query], topk)[0]
        gold = [p for p in passages if p.id == gold_id]
        if not gold:
            return None
        if i == 0:
            thought = f"I need to look up {query}." if len(hops) == 1 else f"I need to look up {query} first."
        else:
            thought = f"{facts[-1]} Now I need to look up {query}."
        segments.append(["model", f"<think> {thought} </think>\n<search> {query} </search>"])
        segments.append(["obs", format_passages(passages, 1000)])
        target = hops[i + 1][0] if i + 1 < len(hops) else answer  # what this passage must tell the model
        facts.append(next(s.rstrip(".") + "." for s in gold[0].text.split(". ") if target in s))
    segments.append(["model", f"<think> {facts[-1]} So the answer is {answer}. </think>\n<answer> {answer} </answer>"])
    return {"question": question["question"], "golden_answers": question["golden_answers"],
            "data_source": question["data_source"], "kind": question["kind"], "segments": segments}


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def build(out_dir: Path, seed: int = 0) -> None:
    world = build_world(seed)
    train, test = make_questions(world)
    train_3hop, test_3hop = make_three_hop_questions(world, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "corpus.jsonl", world["corpus"])
    with tempfile.TemporaryDirectory() as index_dir:
        retriever = BM25Retriever(out_dir / "corpus.jsonl", cache_dir=index_dir)
        for suffix, train_questions, test_questions in (("", train, test), ("_3hop", train_3hop, test_3hop)):
            write_jsonl(out_dir / f"train{suffix}.jsonl", train_questions)
            write_jsonl(out_dir / f"test{suffix}.jsonl", test_questions)
            demos = [d for d in (make_demo(q, retriever, topk=3) for q in train_questions) if d is not None]
            write_jsonl(out_dir / f"demos{suffix}.jsonl", demos)


def measure_recall(out_dir: Path) -> float:
    """BM25 top-3 recall of the gold passage for the single-hop test questions, queried verbatim."""
    with tempfile.TemporaryDirectory() as index_dir:
        retriever = BM25Retriever(out_dir / "corpus.jsonl", cache_dir=index_dir)
        rows = [json.loads(line) for line in (out_dir / "test.jsonl").read_text().splitlines()]
        single = [r for r in rows if r["data_source"] == "default-1hop"]
        results = retriever.search([r["question"] for r in single], 3)
    return sum(r["hops"][0][1] in {p.id for p in found} for r, found in zip(single, results)) / len(single)


def measure_closed_book(out_dir: Path, batch_size: int = 32) -> dict[str, tuple[float, float]]:
    """Exact match, and the rate at which the gold answer appears anywhere in the reply, of the default model
    answering the test questions greedily without search."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from default_model import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = [json.loads(line) for line in (out_dir / "test.jsonl").read_text().splitlines()]
    hits: dict[str, list[tuple[float, float]]] = {}
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"Answer with a few words only. {r['question']}"}],
                                                 add_generation_prompt=True, tokenize=False) for r in batch]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answers = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for r, a in zip(batch, answers):
            contains = any(f" {normalize_answer(g)} " in f" {normalize_answer(a)} " for g in r["golden_answers"])
            hits.setdefault(r["data_source"], []).append((exact_match(a, r["golden_answers"]), float(contains)))
    return {source: tuple(sum(x) / len(v) for x in zip(*v)) for source, v in sorted(hits.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_TASK_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-closed-book", action="store_true", help="skip the closed-book measurement (loads the model)")
    args = parser.parse_args()
    build(args.out, args.seed)
    counts = {name: sum(1 for _ in open(args.out / f"{name}.jsonl")) for name in FILES}
    print(f"wrote {args.out}: " + ", ".join(f"{n} {c}" for n, c in counts.items()))
    print(f"BM25 top-3 recall of the gold passage, single-hop test questions verbatim: {measure_recall(args.out):.3f}")
    if not args.no_closed_book:
        for source, (em, contains) in measure_closed_book(args.out).items():
            print(f"closed-book, default model, {source}: EM {em:.3f}, gold answer anywhere in the reply {contains:.3f}")


if __name__ == "__main__":
    main()
