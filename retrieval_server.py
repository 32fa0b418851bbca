"""A retrieval server speaking the Search-R1 `/retrieve` protocol over a BM25 index of a JSONL corpus.

    python retrieval_server.py --corpus data/default/corpus.jsonl --port 8000
    curl -s 127.0.0.1:8000/retrieve -H 'content-type: application/json' \
         -d '{"queries": ["Mobin Pigubor"], "topk": 3, "return_scores": true}'

Request:  {"queries": [str, ...], "topk": int (null or left out: 3), "return_scores": bool}
Response: {"result": [[{"document": {"id": str, "contents": str}, "score": float}, ...], ...]}
          (without return_scores, each hit is the document itself). A request it cannot serve gets a 4xx and a
          message: 422 for a malformed body (FastAPI's validation), 400 for topk < 1.
Binds to 127.0.0.1 unless told otherwise.
"""

import argparse

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from envs import BM25Retriever

DEFAULT_TOPK = 3


class RetrieveRequest(BaseModel):
    queries: list[str]
    topk: int | None = None  # Search-R1's server falls back to its default k for null
    return_scores: bool = False


def make_app(retriever: BM25Retriever) -> FastAPI:
    app = FastAPI(title="atpo retrieval server")

    @app.post("/retrieve")
    def retrieve(request: RetrieveRequest) -> dict:
        topk = DEFAULT_TOPK if request.topk is None else request.topk
        if topk < 1:
            raise HTTPException(status_code=400, detail=f"topk must be >= 1, got {topk}")
        results = retriever.search(request.queries, topk)
        if request.return_scores:
            return {"result": [[{"document": {"id": p.id, "contents": p.contents}, "score": p.score} for p in hits] for hits in results]}
        return {"result": [[{"id": p.id, "contents": p.contents} for p in hits] for hits in results]}

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True, help="JSONL corpus of {id, contents}")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--cache-dir", default=None, help="where the BM25 index is cached (default: $ATPO_CACHE/bm25)")
    args = parser.parse_args()
    uvicorn.run(make_app(BM25Retriever(args.corpus, cache_dir=args.cache_dir)), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
