"""A scripted stand-in for a model's Messages API (HTTPS on 443), run inside the tests' own
network namespace for examples/agent_loop.py.

    model_server.py DIR ADDR      (DIR holds server.pem, server.key and key: the API key)

Each request is appended to DIR/requests.jsonl as {"api_key": ..., "body": ...}. A request
without the right x-api-key is answered 401. The replies follow a script keyed by how many
tool results the conversation holds, so the agent's loop is exercised end to end: three
`bash` tool calls, then a final text built from what the second call returned.
"""

from __future__ import annotations

import json
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

DIR = Path(sys.argv[1])
ADDR = sys.argv[2]
SCRIPT = [
    "echo key=$ANTHROPIC_API_KEY",
    "python3 -c 'print(6 * 7)' > answer.txt && cat answer.txt",
    "wget -q -T 5 -O- https://other.test/ 2>&1 || echo blocked",
]


def tool_results(messages: list[dict[str, Any]]) -> list[str]:
    out = []
    for m in messages:
        if m.get("role") == "user" and isinstance(m.get("content"), list):
            out += [str(b.get("content", "")) for b in m["content"]
                    if b.get("type") == "tool_result"]
    return out


def reply(body: dict[str, Any]) -> dict[str, Any]:
    done = tool_results(body.get("messages", []))
    step = len(done)
    if step < len(SCRIPT):
        content: list[dict[str, Any]] = [
            {"type": "text", "text": f"Step {step + 1}."},
            {"type": "tool_use", "id": f"toolu_{step}", "name": "bash",
             "input": {"command": SCRIPT[step]}}]
        return {"type": "message", "role": "assistant", "content": content,
                "stop_reason": "tool_use"}
    answer = done[1].strip()
    return {"type": "message", "role": "assistant", "stop_reason": "end_turn",
            "content": [{"type": "text", "text": f"The answer is {answer}."}]}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        key = self.headers.get("x-api-key", "")
        body = json.loads(raw)
        with open(DIR / "requests.jsonl", "a") as f:
            f.write(json.dumps({"api_key": key, "path": self.path, "body": body}) + "\n")
        if key != (DIR / "key").read_text():
            status, answer = 401, {"type": "error", "error": {"type": "authentication_error"}}
        else:
            status, answer = 200, reply(body)
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main() -> None:
    server = ThreadingHTTPServer((ADDR, 443), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(DIR / "server.pem", DIR / "server.key")
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    (DIR / "ready").touch()
    server.serve_forever()


if __name__ == "__main__":
    main()
