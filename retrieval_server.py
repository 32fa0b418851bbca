"""A retrieval server speaking the Search-R1 `/retrieve` protocol over a BM25 index of a JSONL corpus.

    python retrieval_server.py --corpus data/default/corpus.jsonl --port 8000
    curl -s 127.0.0.1:8000/retrieve -H 'content-type: application/json' \
         -d '{"queries": ["Mobin Pigubor"], "topk": 3, "return_scores": true}'

Request:  {"queries": [str, ...], "topk": int (null or left out: 3), "return_scores": bool}
Response: {"result": [[{"document": {"id": str, "contents": str}, "score": float}, ...], ...]}
          (without return_scores, each hit is the document itself). A request it cannot serve gets a 422 and a
          message: a malformed body, topk outside 1..--max-topk, more than --max-queries queries, a query longer
          than --max-query-chars characters, a number that is not finite. An error inside answers 500 with a
          one-line message, no traceback.
Binds to 127.0.0.1 unless told otherwise, and prints the address it listens on.
"""

import argparse

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from envs import BM25Retriever

DEFAULT_TOPK = 3


class RetrieveRequest(BaseModel):
    queries: list[str]
    topk: int | None = None  # Search-R1's server falls back to its default k for null
    return_scores: bool = False


def make_app(retriever: BM25Retriever, max_topk: int = 50, max_queries: int = 1024, max_query_chars: int = 2000) -> FastAPI:
    app = FastAPI(title="atpo retrieval server")

    @app.exception_handler(Exception)
    def internal_error(request: Request, err: Exception) -> JSONResponse:
        return JSONResponse(status_code=500, content={"detail": f"retrieval failed: {type(err).__name__}"})

    @app.exception_handler(RequestValidationError)
    def malformed(request: Request, err: RequestValidationError) -> JSONResponse:
        # the message without the input: FastAPI's default echoes it, and a NaN in it cannot be sent as JSON (a 500)
        problems = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
        return JSONResponse(status_code=422, content={"detail": "; ".join(problems)})

    @app.post("/retrieve")
    def retrieve(request: RetrieveRequest) -> dict:
        topk = DEFAULT_TOPK if request.topk is None else request.topk
        problems = []
        if not 1 <= topk <= max_topk:
            problems.append(f"topk must be in 1..{max_topk}, got {topk}")
        if len(request.queries) > max_queries:
            problems.append(f"at most {max_queries} queries per request, got {len(request.queries)}")
        longest = max(map(len, request.queries), default=0)
        if longest > max_query_chars:
            problems.append(f"a query has at most {max_query_chars} characters, got one of {longest}")
        if problems:
            raise HTTPException(status_code=422, detail="; ".join(problems))
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
    parser.add_argument("--max-topk", type=int, default=50, help="largest topk served")
    parser.add_argument("--max-queries", type=int, default=1024, help="most queries per request")
    parser.add_argument("--max-query-chars", type=int, default=2000, help="longest query served, in characters")
    args = parser.parse_args()
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be in 1..65535, got {args.port}")
    for name in ("max_topk", "max_queries", "max_query_chars"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        retriever = BM25Retriever(args.corpus, cache_dir=args.cache_dir)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: --corpus: {err}") from None
    app = make_app(retriever, args.max_topk, args.max_queries, args.max_query_chars)
    print(f"retrieval server: {len(retriever.corpus)} passages, POST http://{args.host}:{args.port}/retrieve", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
