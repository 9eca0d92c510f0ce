"""A local OpenAI-compatible chat server that answers each memory agent from its own script.

The four agents call concurrently, so answers are routed by the agent the prompt is for (read from
the system message), not by arrival order. Each script is a queue of actions; with nothing
scripted the answer is the valid no-op `{"operations": []}`.
"""

import json
import re
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_ROLE = re.compile(r"You maintain the (CORE|EPISODIC|SEMANTIC|PROCEDURAL) memory")


def agent_of(body: dict) -> str:
    """'core' / 'episodic' / 'semantic' / 'procedural', or 'compress' for the compression step."""
    system = body["messages"][0]["content"]
    if system.startswith("You keep the CORE memory"):
        return "compress"
    m = _ROLE.search(system)
    if m is None:
        raise ValueError(f"not an agent prompt: {system[:80]!r}")
    return m.group(1).lower()


def answer(obj_or_text, finish: str = "stop"):
    text = obj_or_text if isinstance(obj_or_text, str) else json.dumps(obj_or_text)
    return ("answer", text, finish)


def status(code: int):
    return ("status", code)


def sleep(seconds: float):
    return ("sleep", seconds)


class AgentServer:
    def __init__(self):
        self.scripts: dict[str, deque] = {}
        self.requests: list[tuple[str, dict]] = []  # (agent, body) in arrival order
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                agent = agent_of(body)
                with server.lock:
                    server.requests.append((agent, body))
                    script = server.scripts.get(agent)
                    action = script.popleft() if script else answer({"operations": []})
                if action[0] == "sleep":
                    time.sleep(action[1])
                    action = answer({"operations": []})
                if action[0] == "status":
                    code, payload = action[1], json.dumps({"error": {"message": f"scripted {action[1]}"}}).encode()
                else:
                    code = 200
                    payload = json.dumps({
                        "id": f"cmpl-{len(server.requests)}", "object": "chat.completion", "created": 0,
                        "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": action[2],
                                     "message": {"role": "assistant", "content": action[1]}}],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
                    }).encode()
                try:
                    self.send_response(code)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()

    def push(self, agent: str, *actions):
        with self.lock:
            self.scripts.setdefault(agent, deque()).extend(actions)

    def bodies(self, agent: str) -> list[dict]:
        with self.lock:
            return [b for a, b in self.requests if a == agent]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
