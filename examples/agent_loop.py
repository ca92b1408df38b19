#!/usr/bin/env python3
"""An agent loop in a sandbox: a model (Anthropic's Messages API, tool `bash`) decides which
commands to run; they run in the sandbox; their output goes back to the model until it answers.

    ANTHROPIC_API_KEY=sk-... python examples/agent_loop.py "How many CPUs does this machine have?"

The loop itself runs inside the sandbox, so the model API is called from the guest. The guest
never holds the key: $ANTHROPIC_API_KEY in the guest is a placeholder, and matchlock's proxy
puts the real value into requests to the API's host only (a request carrying the placeholder
anywhere else is refused). Nothing but that host is reachable.

Environment (all optional but the key):
  MODEL_API_URL    the Messages endpoint (default https://api.anthropic.com/v1/messages)
  MODEL_API_ADDR   pin the endpoint's host name to this address (a test server)
  MODEL            the model name (default claude-sonnet-4-5)
  MATCHLOCK_EXAMPLE_IMAGE   the sandbox image (default python:3.12-alpine)
  MATCHLOCK_UPSTREAM_CA     a CA the endpoint's certificate chains to, if not a public one
                            (read by `matchlock rpc`)
"""

from __future__ import annotations

import os
import shlex
import sys
from urllib.parse import urlsplit

from matchlock import Client, Sandbox

IMAGE = os.environ.get("MATCHLOCK_EXAMPLE_IMAGE", "python:3.12-alpine")
API_URL = os.environ.get("MODEL_API_URL", "https://api.anthropic.com/v1/messages")

# The loop, run by the guest's python3 (standard library only). It sees the key only as
# the placeholder in its environment and sends that; the proxy substitutes the value.
AGENT = r'''
import json, os, subprocess, sys, urllib.request
TOOLS = [{"name": "bash", "description": "Run a shell command; returns its output.",
          "input_schema": {"type": "object", "properties": {"command": {"type": "string"}},
                           "required": ["command"]}}]

def ask(messages):
    body = json.dumps({"model": os.environ["MODEL"], "max_tokens": 1024, "tools": TOOLS,
                       "messages": messages}).encode()
    req = urllib.request.Request(os.environ["MODEL_API_URL"], data=body, method="POST",
                                 headers={"x-api-key": os.environ["ANTHROPIC_API_KEY"],
                                          "anthropic-version": "2023-06-01",
                                          "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)

messages = [{"role": "user", "content": sys.argv[1]}]
for turn in range(20):
    reply = ask(messages)
    messages.append({"role": "assistant", "content": reply["content"]})
    results = []
    for block in reply["content"]:
        if block["type"] == "text":
            print(block["text"], flush=True)
        elif block["type"] == "tool_use":
            command = block["input"]["command"]
            print(f"$ {command}", flush=True)
            p = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120)
            output = (p.stdout + p.stderr)[-20000:] or f"(exit {p.returncode})"
            print(output, end="" if output.endswith("\n") else "\n", flush=True)
            results.append({"type": "tool_result", "tool_use_id": block["id"],
                            "content": output, "is_error": p.returncode != 0})
    if reply.get("stop_reason") != "tool_use" or not results:
        break
    messages.append({"role": "user", "content": results})
'''


def main(task: str) -> int:
    key = os.environ.get("ANTHROPIC_API_KEY", "")
    if not key:
        sys.exit("agent_loop: set ANTHROPIC_API_KEY")
    host = urlsplit(API_URL).hostname or ""
    sandbox = (Sandbox(IMAGE)
               .allow_host(host)
               .add_secret("ANTHROPIC_API_KEY", key, host)
               .with_env("MODEL_API_URL", API_URL)
               .with_env("MODEL", os.environ.get("MODEL", "claude-sonnet-4-5")))
    if os.environ.get("MODEL_API_ADDR"):
        sandbox.add_host(host, os.environ["MODEL_API_ADDR"])
    with Client() as client:
        client.launch(sandbox)
        client.write_file("/tmp/agent.py", AGENT)
        run = client.exec_stream(f"python3 /tmp/agent.py {shlex.quote(task)}", stdout=sys.stdout,
                                 stderr=sys.stderr, working_dir="/tmp")
    client.remove()
    return run.exit_code


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
