"""An OpenAI-compatible chat-completions endpoint on loopback, for tests of the clients that call one (the
model verifier, the OpenAI chat model of the GenRM's judge and of PaCoRe inference)."""

import http.server
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# A request's JSON body -> (HTTP status, the message's content, its reasoning_content or None), optionally
# followed by the choice's finish_reason ("stop" when not given).
Answer = Callable[[dict], tuple]


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        """A client that timed out and hung up (the timeout tests) is expected, not an error to print."""


@contextmanager
def chat_endpoint(answer: Answer) -> Iterator[str]:
    """Serves `answer` on a free loopback port; yields the base URL (`.../v1`)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, content, reasoning, *finish = answer(body)
            if status != 200:
                self.send_response(status)
                self.end_headers()
                return
            message = {"role": "assistant", "content": content, "reasoning_content": reasoning}
            choice = {"index": 0, "finish_reason": finish[0] if finish else "stop", "message": message}
            reply = {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [choice]}
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = QuietServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
