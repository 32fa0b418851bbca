"""The search tool for verl's multi-turn agent loop (rollout.multi_turn.function_tool_path=this file).

It asks a server speaking the Search-R1 `/retrieve` protocol (ours: `retrieval_server.py`) for the top passages of
a query and returns them as "Doc i (Title: ...) text" lines, the observation format of envs.py. The server's address
comes from ATPO_RETRIEVAL_URL (default http://127.0.0.1:8000/retrieve). A server that is down or answers with an
error raises, so verl's agent loop reports the failed call instead of training on an empty observation.
"""

import json
import os
import urllib.request

from verl.tools.function_tool import function_tool

RETRIEVAL_URL = os.environ.get("ATPO_RETRIEVAL_URL", "http://127.0.0.1:8000/retrieve")
TOPK = 3


@function_tool("search")
def search(query: str) -> str:
    """Search the corpus and return the top passages.

    Args:
        query: What to search for, e.g. a name or a question.
    """
    body = json.dumps({"queries": [query], "topk": TOPK, "return_scores": False}).encode()
    request = urllib.request.Request(RETRIEVAL_URL, data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        hits = json.load(response)["result"][0]
    docs = []
    for i, hit in enumerate(hits, start=1):
        title, _, text = hit["contents"].partition("\n")  # first line: the title (Search-R1 corpus format)
        title = title.strip().strip('"')
        docs.append(f"Doc {i} (Title: {title}) {text.strip()}")
    return "\n".join(docs)
